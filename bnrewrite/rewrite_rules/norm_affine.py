"""Rule ``norm-affine`` (FD112, opt-in): a per-sample norm's elementwise affine folds into the
layers that read it: ``W (gamma * n + beta) + b = (W diag(gamma)) n + (W beta + b)`` (for a conv
the shift is summed over the kernel: exact where no padded zero is read). Rotation- and
smoothing-based quantization (QuaRot, SpinQuant, SmoothQuant) starts with this step.

Matches: a LayerNorm or RMSNorm (torch's, or any module computing ``normalize(x) * weight [+
bias]`` op by op: found by what it computes, a reduction and a reciprocal square root before the
scale), a GroupNorm or an InstanceNorm, with an affine of stored parameters.
Check (an FD112 finding with the reason when it fails): the norm and every reader run once; only
Linear layers (affine on the last axis) or convs without zero padding (on the channel axis), as
modules or ATen ops on a module's own weights, read its output; nothing else reads its affine;
no other fold changes a reader; no reader lies inside a module that becomes a graph.
Rewrite (plan steps): every reader gets its folded weight and bias; the norm keeps normalizing
with no affine (torch's classes: ``elementwise_affine``/``affine`` off) or weight 1, bias 0.
Local check: each reader against the original on ``gamma * x + beta`` (``LayerCheck``), the norm
times ``gamma`` plus ``beta`` against the original norm (:class:`NormAffineCheck`).
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from bnrewrite.codes import finding
from bnrewrite.diagnostics import Action, Diagnostic
from bnrewrite.editor.units import CheckSpec, ParamEdit, SetEdit, Unit, covers
from bnrewrite.local_checks import LocalCheck, bare_copy, channel_view, mismatch, run_original
from bnrewrite.runtime import own_copies
from bnrewrite.semantics import fold_math
from bnrewrite.semantics.affine import Absorbed, Affine, Side
from bnrewrite.semantics.captured import Capture, Region
from bnrewrite.semantics.layers import LayerSite, layer_site, module_layer
from bnrewrite.semantics.norms import fetch_attr, forward_is_torchs, other_norm_family
from bnrewrite.semantics.ops import module_at, source_line, stack_path, target_name
from bnrewrite.semantics.readers import is_cast_of, readers_through_casts, value_readers
from bnrewrite.semantics.reshapes import chain_forward, reshape_kind, track

NAME = "norm-affine"
CODE = "FD112"

aten = torch.ops.aten
F = torch.nn.functional
# functional norms: target -> positions of (weight, bias); None: the op has no bias
_FUNCTIONAL: dict[Any, tuple[int, int | None]] = {
    F.layer_norm: (2, 3), torch.layer_norm: (2, 3), aten.layer_norm.default: (2, 3),
    F.group_norm: (2, 3), torch.group_norm: (2, 3), aten.group_norm.default: (2, 3),
    F.instance_norm: (3, 4), torch.instance_norm: (3, 4), aten.instance_norm.default: (1, 2),
    **({F.rms_norm: (2, None)} if hasattr(F, "rms_norm") else {}),
    **({aten.rms_norm.default: (2, None)} if hasattr(aten, "rms_norm") else {}),
}  # fmt: skip
_ROOTS = frozenset({"rsqrt", "sqrt", "norm", "std", "normalize", "rms_norm", "layer_norm"})
_REDUCTIONS = frozenset(
    {"mean", "var", "std", "norm", "sum", "var_mean", "normalize", "rms_norm", "layer_norm"}
)
_OFF_FLAGS = ("elementwise_affine", "affine")


@dataclass
class Match:
    """One norm affine: the value it produces, the module whose parameters hold it, and the axis."""

    region: Region
    node: fx.Node  # the norm's output (after the affine)
    path: str  # the module holding the affine parameters
    module: nn.Module
    weight: str  # parameter names on that module
    bias: str | None
    axis: int  # 1: the channel axis; -1: the last axis
    torch_class: bool  # torch's own class and forward: the affine can be switched off
    kind: str
    nodes: tuple[fx.Node, ...] = ()  # the ops that apply the affine (they read its parameters)
    out_axis: int | None = None  # the affine's axis in the module's output, where that differs


@dataclass
class Planned:
    """What the rule planned: units of tree edits, and a finding for every norm it refused."""

    units: list[Unit] = field(default_factory=list)
    refusals: list[Diagnostic] = field(default_factory=list)


def plan(cap: Capture, *, taken: set[str], scopes: dict[str, Any], selector: Any = None) -> Planned:
    """Plan the fold of every matched norm affine (see the module doc). ``taken``: module paths
    other folds already change; ``scopes``: modules that become graphs."""
    out = Planned()
    calls = cap.graph_calls()
    shared = cap.tied_parameters()
    for region in cap.regions:
        for node in list(region.gm.graph.nodes):
            m = match(region, node)
            if m is None or (selector is not None and not selector.matches(m.path, m.kind)):
                continue
            _as_user_module(cap, m)
            readers, why = check(cap, m, calls, taken | shared, scopes)
            if why:
                out.refusals.append(_refusal(m, why))
                continue
            out.units.append(rewrite(m, readers))
            taken.update(r.module_path or "" for r in readers)
    return out


def _as_user_module(cap: Capture, m: Match) -> None:
    """The user's module for ``m`` (a graph may hold a bare stand-in): its class, and whether it
    is torch's norm class with torch's forward (an ATen graph of ``nn.LayerNorm``)."""
    if m.torch_class or not isinstance(cap.model, nn.Module):
        return
    user = cap.model.get_submodule(m.path)
    m.kind = type(user).__name__
    weight = user._parameters.get(m.weight)
    if other_norm_family(user) and forward_is_torchs(user) and weight is not None:
        m.torch_class = weight is m.module._parameters.get(m.weight)
        m.module = user if m.torch_class else m.module


# -- match --------------------------------------------------------------------------------------
def match(region: Region, node: fx.Node) -> Match | None:
    """The norm affine ``node`` applies: a torch norm module call, a functional norm on a
    module's parameters, or ``normalized * weight [+ bias]`` computed op by op."""
    if node.op == "call_module":
        module = module_at(region.gm, str(node.target))
        if other_norm_family(module) is None or not forward_is_torchs(module):
            return None
        if getattr(module, "weight", None) is None:
            return None
        bias = "bias" if getattr(module, "bias", None) is not None else None
        path = region.module_path(node) or ""
        kind = type(module).__name__
        return Match(region, node, path, module, "weight", bias, _axis(module), True, kind, (node,))
    if node.op == "call_function" and node.target in _FUNCTIONAL:
        return _functional(region, node)
    if node.op == "call_function" and getattr(node.target, "__name__", "") == "mul":
        return _by_ops(region, node)
    return None


def _axis(module: nn.Module) -> int:
    shape = getattr(module, "normalized_shape", None)
    if shape is not None:
        return -1 if len(tuple(shape)) == 1 else 0  # 0: over several axes (refused)
    return 1


def _param_of(region: Region, arg: Any) -> tuple[str, str] | None:
    """(module path, parameter name) of a get_attr argument reading a module's parameter."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    local, _, name = str(arg.target).rpartition(".")
    path = f"{region.path}.{local}" if region.path and local else (region.path or local)
    owner = module_at(region.gm, local) if local else region.gm
    return (path, name) if isinstance(owner._parameters.get(name), nn.Parameter) else None


def _functional(region: Region, node: fx.Node) -> Match | None:
    w_at, b_at = _FUNCTIONAL[node.target]
    args = list(node.args)
    w = _param_of(region, args[w_at] if w_at < len(args) else node.kwargs.get("weight"))
    if w is None:
        return None
    b = _param_of(region, args[b_at] if b_at is not None and b_at < len(args) else node.kwargs.get("bias"))
    if b is not None and b[0] != w[0]:
        return None
    local = w[0][len(region.path) + 1 :] if region.path else w[0]
    module = module_at(region.gm, local) if local else region.gm
    torch_class = other_norm_family(module) is not None and forward_is_torchs(module)
    name = str(getattr(node.target, "__name__", node.target))
    if torch_class:
        axis = _axis(module)
    elif "group" in name or "instance" in name:
        axis = 1
    else:  # layer_norm / rms_norm: the last axis, when it normalizes one
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        axis = -1 if isinstance(shape, (list, tuple)) and len(shape) == 1 else 0
    bias = b[1] if b else None
    return Match(region, node, w[0], module, w[1], bias, axis, torch_class, target_name(node), (node,))


def _by_ops(region: Region, node: fx.Node) -> Match | None:
    """``normalized * weight`` (either order), and ``+ bias`` where one follows, in one module."""
    a, b = (*node.args, None, None)[:2]
    param, value = (a, b) if _param_of(region, a) else (b, a)
    owner = _param_of(region, param)
    if owner is None or not isinstance(value, fx.Node):
        return None
    path, wname = owner
    weight = fetch_attr(region.gm, str(param.target))
    if weight.dim() < 1 or weight.numel() != weight.shape[0] or _scope(region, node) != path:
        return None
    if not _normalizes(region, value, path):
        return None
    out, bias = node, None
    users = value_readers(node)
    if len(users) == 1 and getattr(users[0].target, "__name__", "") == "add":
        other = [x for x in users[0].args if x is not node]
        bp = _param_of(region, other[0]) if len(other) == 1 else None
        if (
            bp is not None
            and bp[0] == path
            and fetch_attr(region.gm, str(other[0].target)).shape == weight.shape
        ):
            out, bias = users[0], bp[1]
    local = path[len(region.path) + 1 :] if region.path else path
    module = module_at(region.gm, local) if local else region.gm
    axis = -1 if weight.dim() == 1 else -weight.dim()  # (C, 1, 1): the channel axis of a 4-D value
    nodes = (node, out) if out is not node else (node,)
    return Match(region, out, path, module, wname, bias, axis, False, type(module).__name__, nodes)


def _scope(region: Region, node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    local = stack_path(list(stack.values())[-1][0])
    return f"{region.path}.{local}" if region.path and local else (region.path or local)


def _normalizes(region: Region, value: fx.Node, path: str) -> bool:
    """True when ``value`` is computed, inside the module at ``path``, by a reduction and a
    (reciprocal) square root: what a LayerNorm or an RMSNorm does before its scale."""
    names: set[str] = set()
    todo, seen = [value], set()
    while todo:
        n = todo.pop()
        if n in seen or n.op in ("placeholder", "get_attr") or _scope(region, n) != path:
            continue
        seen.add(n)
        names.add(str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", str(n.target)))
        todo.extend(n.all_input_nodes)
    names = {n.split(".")[0] for n in names}
    return bool(names & _ROOTS) and bool(names & _REDUCTIONS)


# -- check --------------------------------------------------------------------------------------


def check(
    cap: Capture, m: Match, calls: Counter[str], taken: set[str], scopes: dict[str, Any]
) -> tuple[list[LayerSite], str]:
    """The layers that absorb the affine, or why it cannot fold (empty readers and a reason)."""
    if m.axis == 0:
        return [], "the affine spans several axes (normalized_shape of more than one dim)"
    n = cap.runs(m.path, calls)
    if n != 1:
        return [], f"{m.path} runs {n} times"
    if any(covers(s, m.path) for s in scopes):
        return [], f"{m.path} lies inside a module that becomes its folded graph"
    other = _other_reads(m)
    if other:
        return [], f"other code reads its affine parameters ({other})"
    readers = readers_through_casts(m.node)
    if not readers:
        return [], "nothing reads its output"
    layers: list[LayerSite] = []
    for r in readers:
        followed, why = _through_reshapes(cap, m, r)
        for reader, src, axis, rank in followed:
            layer, why = _reader(cap, m, reader, calls, taken, scopes, src=src, axis=axis, rank=rank)
            if layer is None:
                break
            layers.append(layer)
        if why:
            return [], why
    rec = cap.recording
    eager = rec.readers.get(m.path, 0) if rec is not None and m.path in rec.out_ids else 0
    if eager > len(readers) and m.node.op == "call_module":
        return [], f"in the eager run its output is read {eager} times (the graph shows {len(readers)})"
    return layers, ""


def _other_reads(m: Match) -> str:
    """Nodes other than the affine's own ops that read its parameters (tied weights, code that
    reads ``norm.weight``)."""
    local = m.path[len(m.region.path) + 1 :] if m.region.path else m.path
    names = {f"{local}.{p}" if local else p for p in (m.weight, m.bias) if p}
    readers = [
        u.name
        for n in m.region.gm.graph.nodes
        if n.op == "get_attr" and str(n.target) in names
        for u in n.users
        if u not in m.nodes
    ]
    return ", ".join(readers[:3])


def _through_reshapes(cap: Capture, m: Match, r: fx.Node) -> tuple[list[tuple[Any, ...]], str]:
    """(reader, the node it must read, the affine's axis there, that node's rank) for ``r``, or
    for the readers after a chain of permutes/reshapes ``r`` starts (a channels-first LayerNorm:
    permute, layer_norm, permute), with the axis followed op by op on recorded shapes."""
    if reshape_kind(r) is None or not r.args or r.args[0] is not m.node:
        return [(r, m.node, m.axis, None)], ""
    chain = [r, *chain_forward(r)]
    shape_of = cap.shape_lookup().shape
    rank = len(shape_of(m.node) or ())
    axis = track(chain, m.axis % rank, shape_of) if rank else None
    end_shape = shape_of(chain[-1])
    if axis is None or end_shape is None:
        return [], f"after {', '.join(n.name for n in chain)} the affine's axis cannot be followed"
    inside = [n for n in chain if (_scope(m.region, n) or "").startswith(m.path)]
    if inside and inside == chain[: len(inside)]:  # the module's own output is further on
        m.out_axis = track(inside, m.axis % rank, shape_of)
    return [(u, chain[-1], axis, len(end_shape)) for u in readers_through_casts(chain[-1])], ""


def _reader(
    cap: Capture, m: Match, r: fx.Node, calls: Counter[str], taken: set[str], scopes: dict[str, Any], *,
    src: fx.Node, axis: int, rank: int | None,
) -> tuple[LayerSite | None, str]:  # fmt: skip
    if r.op == "output":
        return None, "the model returns its output"
    layer = layer_site(m.region, r)
    what = f"{r.name} ({target_name(r)})"
    if layer is not None and r.op != "call_module":
        layer = module_layer(cap.model, layer)  # an ATen layer applying a module's own weights
    if layer is None or layer.module is None:
        kind = "a functional layer" if layer is not None else "not a Linear or conv layer"
        return None, f"{what} reads its output ({kind}): the affine output is needed there"
    path = layer.module_path or ""
    module = layer.module
    if isinstance(module, _ConvTransposeNd):
        return None, f"{path} is a transposed conv"
    if r.args[:1] != (src,) and not is_cast_of(r.args[0], src):
        return None, f"{what} reads its output other than as its input"
    last = axis == -1 or (rank is not None and axis == rank - 1)
    channel = axis == 1 or (rank is None and axis == -(module.weight.dim() - 1))
    if isinstance(module, nn.Linear) and not last:
        return None, f"{path} reads the last axis; the affine is on the channel axis"
    if isinstance(module, _ConvNd) and not channel:
        return None, f"{path} reads the channel axis; the affine is on the last axis"
    if layer.zero_pads():
        return None, f"{path} pads with zeros (the shift would reach the padded border)"
    if path in taken or any(f"{path}.{n}" in taken for n in ("weight", "bias")):
        other = (
            "its weight or bias is also another module's (tied)"
            if path not in taken
            else "another fold changes it"
        )
        return None, f"{path}: {other}"
    if any(covers(s, path) for s in scopes):
        return None, f"{path} lies inside a module that becomes its folded graph"
    n = cap.runs(path, calls)
    if n != 1:
        return None, f"{path} runs {n} times"
    return layer, ""


def _refusal(m: Match, why: str) -> Diagnostic:
    return finding(
        CODE,
        f"{m.path}: affine not folded into the layers after it: {why}",
        m.region.qualify(m.node.name),
        m.path,
        source_line(m.node),
    )


# -- rewrite ------------------------------------------------------------------------------------
def affine_of(m: Match) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The norm's scale and shift, flat, in float64."""
    weight = m.module._parameters[m.weight]
    bias = m.module._parameters[m.bias] if m.bias else None
    assert weight is not None
    return weight.detach().double().flatten(), bias.detach().double().flatten() if bias is not None else None


def _folded(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None) -> tuple[Any, Any]:
    """The reader's folded (weight, bias), in its dtype."""
    w, b = layer.weight, layer.bias
    kind = "linear" if isinstance(layer, nn.Linear) else "conv"
    groups = getattr(layer, "groups", 1)
    t = shift if shift is not None else torch.zeros_like(scale)
    w64, b64 = fold_math.into_following(kind, w, b, groups, scale, t)
    new_b = None if (shift is None and b is None) else b64.to(dtype=(b if b is not None else w).dtype)
    return w64.to(dtype=w.dtype, device=w.device), new_b if new_b is None else new_b.to(w.device)


def rewrite(m: Match, readers: list[LayerSite]) -> Unit:
    """The plan steps: every reader's folded weights, the norm's identity affine, their checks."""
    scale, shift = affine_of(m)
    paths = [r.module_path or "" for r in readers]
    action = Action(
        NAME,
        m.region.qualify(m.node.name),
        m.path,
        f"elementwise affine ({m.kind}) into the {len(readers)} layer(s) that read it",
        target=", ".join(paths),
        code=CODE,
    )
    unit = Unit(actions=[action], paths={m.path, *paths})
    for r in readers:
        unit.edits.append(ParamEdit(r.module_path or "", functools.partial(_folded, r.module, scale, shift)))
        unit.specs.append(
            CheckSpec(
                "layer", r.module_path or "", absorbed=[Absorbed(Side.BEFORE, Affine(scale, shift, m.axis))]
            )
        )
    unit.edits.append(_identity(m))
    if not any(covers(m.path, p) for p in paths):  # the module's output is the norm's: check it alone
        label = m.path or "<root>"
        axis = m.out_axis if m.out_axis is not None else m.axis
        build = functools.partial(NormAffineCheck, label, affine=Affine(scale, shift, axis))
        unit.specs.append(CheckSpec("module", m.path, build=build))
    return unit


def _identity(m: Match) -> SetEdit:
    """The norm's affine off (torch's classes) or the identity (weight 1, bias 0)."""
    if m.torch_class:
        flags = {f: False for f in _OFF_FLAGS if isinstance(getattr(m.module, f, None), bool)}
        params = {m.weight: None, **({m.bias: None} if m.bias else {})}
        return SetEdit(m.path, params, flags)
    params = {}
    for name, fill in ((m.weight, torch.ones_like), (m.bias, torch.zeros_like)):
        old = m.module._parameters.get(name) if name else None
        if name and old is not None:
            params[name] = nn.Parameter(fill(old), old.requires_grad)
    return SetEdit(m.path, params)


class NormAffineCheck(LocalCheck):
    """The norm with its identity affine, scaled and shifted by the affine it gave away, against
    the original norm on the same input."""

    def __init__(self, label: str, new: nn.Module, original: nn.Module, *, affine: Affine) -> None:
        super().__init__(label)
        self.new, self.affine = new, affine
        self.original = bare_copy(original)  # without the hooks the proof puts on the old object

    def expect(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return run_original(self.original, *own_copies((args, kwargs)))

    def check(self, want: Any, out: Any) -> None:
        a = self.affine
        got = out.double() * channel_view(a.scale, out, a.axis).double()
        if a.shift is not None:
            got = got + channel_view(a.shift, got, a.axis)
        magnitude = float(want.abs().max()) if want.numel() else 0.0
        problem = mismatch(got.to(want.dtype), want, magnitude, 1)
        if problem:
            self.fail(f"the norm with its affine taken out {problem} (compared with the original norm)")
