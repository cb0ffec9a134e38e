"""Affine sites: modules that compute a per-channel ``x * scale + shift`` from stored tensors.

Matches: every group of ops that one module's own forward ran (its ``nn_module_stack``), in
either dialect, that reads one activation and returns one value, reads at least one of the
module's stored tensors, and calls no module: a frozen BatchNorm in any spelling (rsqrt, sqrt,
``pow(-0.5)``, division, reshapes or indexing of the buffers, ``addcmul``), a ResMLP/CaiT-style
``Affine`` (``alpha * x + beta``), a layer-scale multiply (``gamma * x``), a channel scale.

Guarantees: a group is an affine site only when evaluating it says so, not its spelling: the
group's ops run in float64 on probes of the recorded input shape (batch 1) - zeros give the
shift, ones the scale plus the shift, and a random probe must give ``r * scale + shift`` - and
scale and shift vary along one axis only (dim 1, or the last dim of a token tensor). A group
that looks like one but is not (or cannot be evaluated) is recorded with the reason, so it is
never left without a diagnostic (FD208).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from bnrewrite.precision import Float64Everywhere
from bnrewrite.semantics import ops as graph_ops
from bnrewrite.semantics.ops import node_shape, propagate_shapes, reads_only_stored, stack_path
from bnrewrite.semantics.readers import value_readers

_META = "bnrewrite_affine"  # region.gm.meta key: (sites by output node, rejects by module path)


@dataclass
class AffineGroup:
    """One module's ops that compute a per-channel affine map, with its coefficients."""

    path: str  # region-local module path
    kind: str  # the module's class name
    input: fx.Node
    output: fx.Node
    nodes: list[fx.Node]
    scale: torch.Tensor  # float64, one value per channel
    shift: torch.Tensor
    axis: int  # 1, or -1 for the last dim


def _innermost(node: fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    return stack_path(path), str(getattr(kind, "__name__", kind)).rpartition(".")[2]


def _groups(gm: fx.GraphModule) -> dict[str, tuple[str, list[fx.Node]]]:
    groups: dict[str, tuple[str, list[fx.Node]]] = {}
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        inner = _innermost(n)
        if inner is not None and inner[0]:
            groups.setdefault(inner[0], (inner[1], []))[1].append(n)
    return groups


def affine_groups(region: Any) -> tuple[dict[fx.Node, AffineGroup], dict[str, tuple[str, str]]]:
    """(affine sites keyed by their output node, {module path: (kind, why not)} for groups that
    look like a norm or an affine layer but are not one). Cached on the graph module."""
    cached = region.gm.meta.get(_META)
    if cached is not None:
        return cached
    found: dict[fx.Node, AffineGroup] = {}
    rejects: dict[str, tuple[str, str]] = {}
    order = {n: i for i, n in enumerate(region.gm.graph.nodes)}
    for path, (kind, nodes) in _groups(region.gm).items():
        group, why = _examine(region, path, kind, nodes, order)
        if group is not None:
            found[group.output] = group
        elif why and _looks_like_norm(kind, path, region):
            rejects[path] = (kind, why)
    region.gm.meta[_META] = (found, rejects)
    return found, rejects


def _looks_like_norm(kind: str, path: str, region: Any) -> bool:
    name = kind.lower()
    if any(w in name for w in ("norm", "frozen", "affine", "scale", "bn")):
        return True
    try:
        module = region.gm.get_submodule(path)
    except AttributeError:
        return False
    return "running_mean" in module._buffers and "running_var" in module._buffers


def _with_coefficients(nodes: list[fx.Node], order: dict[fx.Node, int]) -> list[fx.Node]:
    """The group plus the ops that compute its coefficients from stored tensors alone (indexing
    or reshaping a buffer may be recorded outside the module's stack)."""
    members = set(nodes)
    todo = list(nodes)
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a in members or a.op not in ("call_function", "call_method") or not reads_only_stored(a):
                continue
            if all(u in members for u in value_readers(a)):
                members.add(a)
                todo.append(a)
    return sorted(members, key=order.__getitem__)


def _examine(
    region: Any, path: str, kind: str, nodes: list[fx.Node], order: dict[fx.Node, int]
) -> tuple[AffineGroup | None, str]:
    if any(n.op == "call_module" for n in nodes):
        return None, ""  # a module that calls others is no single affine map
    nodes = _with_coefficients(nodes, order)
    members = set(nodes)
    norm_ops = {**graph_ops.BN_TARGETS, **graph_ops.OTHER_NORM_TARGETS, **graph_ops.LAYER_TARGETS}
    if any(n.op == "call_function" and n.target in norm_ops for n in nodes):
        return None, ""  # a batch_norm (a site of its own), a per-sample norm (FD205), a conv/linear
    if not any(a.op == "get_attr" for n in nodes for a in n.all_input_nodes):
        return None, ""  # reads no stored tensor: an activation, not an affine layer
    external = {a for n in nodes for a in n.all_input_nodes if a not in members and a.op != "get_attr"}
    outputs = [n for n in nodes if any(u not in members for u in value_readers(n))]
    if len(external) != 1 or len(outputs) != 1:
        return None, f"its forward reads {len(external)} activations and returns {len(outputs)} values"
    inp, out = next(iter(external)), outputs[0]
    shape = _shape(inp)
    if shape is None and not region.shapes_known and region.inputs is not None:
        propagate_shapes(region.gm, region.inputs)  # once per region: then every node has its shape
        region.shapes_known = True
        shape = _shape(inp)
    if shape is None or len(shape) < 2:
        return None, "the shape of its input is unknown here (pass example inputs)"
    try:
        scale, shift, axis = _probe(nodes, inp, out, shape, region)
    except _NotAffine as exc:
        return None, str(exc)
    return AffineGroup(path, kind, inp, out, nodes, scale, shift, axis), ""


class _NotAffine(Exception):
    pass


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    shape = node_shape(node)
    if shape is None or any(s < 0 for s in shape):
        return None
    return shape


def _probe(
    nodes: list[fx.Node], inp: fx.Node, out: fx.Node, shape: tuple[int, ...], region: Any
) -> tuple[torch.Tensor, torch.Tensor, int]:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {inp: graph.placeholder("x")}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in env:
                env[a] = graph.get_attr(str(a.target))
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[out])
    run = fx.Interpreter(region.gm, graph=graph).run  # no GraphModule: nothing to compile
    probe_shape = (1, *shape[1:])
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(probe_shape, generator=g, dtype=torch.float64)
    try:  # a GraphModule prints the traceback of a failing call: keep the probe quiet
        with torch.no_grad(), Float64Everywhere(), contextlib.redirect_stderr(io.StringIO()):
            zero = run(torch.zeros(probe_shape, dtype=torch.float64))
            one = run(torch.ones(probe_shape, dtype=torch.float64))
            got = run(rand)
    except Exception as exc:
        raise _NotAffine(f"its forward cannot be evaluated alone ({type(exc).__name__})") from exc
    if not all(isinstance(t, torch.Tensor) and t.shape == probe_shape for t in (zero, one, got)):
        raise _NotAffine("its output does not have its input's shape")
    scale_map, shift_map = one.double() - zero.double(), zero.double()
    want = rand * scale_map + shift_map
    tol = 1e-9 * float(want.abs().max().clamp_min(1.0))
    if not bool(torch.isfinite(want).all()) or float((got.double() - want).abs().max()) > tol:
        raise _NotAffine("it is not an affine map of its input")
    axis = _channel_axis(scale_map, shift_map, shape, nodes)
    index = [0] * len(probe_shape)
    index[axis] = slice(None)
    return (
        scale_map[tuple(index)].clone(),
        shift_map[tuple(index)].clone(),
        (-1 if axis == len(shape) - 1 and axis != 1 else 1),
    )


def _constant_except(t: torch.Tensor, axis: int) -> bool:
    index = [slice(0, 1)] * t.dim()
    index[axis] = slice(None)
    return bool(torch.equal(t, t[tuple(index)].expand_as(t)))


def _channel_axis(
    scale: torch.Tensor, shift: torch.Tensor, shape: tuple[int, ...], nodes: list[fx.Node]
) -> int:
    """The one axis along which scale and shift vary: dim 1, or the last dim."""
    candidates = [1] if len(shape) == 2 else [1, len(shape) - 1]
    varying = [a for a in candidates if _constant_except(scale, a) and _constant_except(shift, a)]
    if not varying:
        raise _NotAffine("its scale and shift vary along more than one axis (not per channel)")
    if len(varying) == 1:
        return varying[0]
    # Constant coefficients (e.g. an untrained init): the axis whose size the stored tensors have.
    sizes = {int(t.numel()) for t in _stored_values(nodes) if t.numel() > 1}
    by_size = [a for a in varying if shape[a] in sizes]
    return by_size[0] if len(by_size) == 1 else varying[0]


def _stored_values(nodes: list[fx.Node]) -> list[torch.Tensor]:
    values = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                obj: Any = a.graph.owning_module
                for part in str(a.target).split("."):
                    obj = getattr(obj, part, None)
                if isinstance(obj, torch.Tensor):
                    values.append(obj)
    return values
