"""Norm surgery: swap, insert, remove and fix norm layers, each reporting whether the function
is preserved.

Module norms are replaced copy-on-write in the user's own module tree, so the result keeps the
model's class (and stays trainable as before); functional/ATen BatchNorms and insertions are
rewritten in the traced graph, and only the regions that needed it become GraphModules. An
exact rewrite is verified numerically on the example inputs; a function-changing one reports the
measured output deviation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from . import codes as catalogue
from .diagnostics import Action, Diagnostic, Report
from .errors import UsageError, VerificationError
from .fold import RewriteResult
from .graph.capture import Capture, Region, capture, capture_submodule, compile_now
from .graph.edit import Editor, shallow_copy
from .graph.norms import (
    BNSite,
    OtherNormSite,
    bn_site,
    find_norms,
    layer_site,
    module_bn_site,
    norm_with_stats,
    opaque_norms,
    other_norm_site,
)
from .graph.ops import node_shape, source_line, stack_path
from .graph.reshapes import value_readers
from .passes.norm_factory import TARGETS, SwapRefused, default_groups, from_batchnorm, to_batchnorm
from .passes.norm_rest import Rest, ops_by_module, rest_of
from .passes.tree_edit import common_prefix, covers, node_scope
from .runtime import buffers_restored
from .select import Selector
from .verify import verify

Redo = Callable[[nn.Module, "tuple[Any, ...] | None", str], nn.Module]


class Rewriter:
    """Collects module replacements and graph edits, then builds the rewritten model.

    Module replacements land in a copy of the user's module tree. Graph edits are carried by
    the smallest module that encloses every edited node: when that is deeper than the captured
    region, ``redo`` runs the same surgery on that module alone (its own graph, recorded inputs)
    and only it is replaced; every replacement by a graph is reported (FD104)."""

    def __init__(self, cap: Capture, report: Report, redo: Redo | None = None) -> None:
        self.cap = cap
        self.report = report
        self.redo = redo
        self.modules: dict[str, nn.Module] = {}
        self.edited: dict[str, Editor] = {}
        self.scopes: dict[str, set[str]] = {}
        self._lookup: dict[str, nn.Module] | None = None

    def replace_module(self, path: str, new: nn.Module) -> None:
        self.modules[path] = new

    def editor(self, region: Region, node: fx.Node | None = None) -> Editor:
        if region.path not in self.edited:
            self.edited[region.path] = Editor(region.gm)
        scope = region.path if node is None else node_scope(self._module_at, region, node)
        self.scopes.setdefault(region.path, set()).add(scope)
        return self.edited[region.path]

    def _module_at(self, path: str) -> nn.Module | None:
        if self._lookup is None:
            model = self.cap.model
            self._lookup = dict(model.named_modules()) if isinstance(model, nn.Module) else {}
        return self._lookup.get(path)

    def build(self) -> nn.Module:
        cap = self.cap
        if isinstance(cap.model, (torch.export.ExportedProgram, fx.GraphModule)):
            region = cap.regions[0]
            ed = self.editor(region)
            for path, new in self.modules.items():
                ed.set_module(path, new)
            compile_now(region.gm)
            return region.gm
        root = shallow_copy(cap.model)
        ed = Editor(root)
        pending = dict(self.modules)
        for rpath, reditor in self.edited.items():
            scope = common_prefix(sorted(self.scopes.get(rpath, {rpath})))
            if scope != rpath and self.redo is not None and covers(rpath, scope):
                part = capture_submodule(cap, scope)
                new = self.redo(cap.model.get_submodule(scope), part.inputs if part else None, scope)
                pending = {p: m for p, m in pending.items() if not covers(scope, p)}
                self._graph_note(scope)
                ed.set_module(scope, new)
                continue
            prefix = rpath + "."
            for path in [p for p in pending if rpath == "" or p.startswith(prefix)]:
                reditor.set_module(path[len(prefix) :] if rpath else path, pending.pop(path))
            region = self.cap_region(rpath)
            compile_now(region.gm)
            self._graph_note(rpath)
            if rpath == "":
                return region.gm
            ed.set_module(rpath, region.gm)
        for path, new in pending.items():
            ed.set_module(path, new)
        return root

    def _graph_note(self, path: str, why: str | None = None) -> None:
        why = why or (
            "a functional norm or an inserted layer is a graph edit that the module tree cannot express"
        )
        self.report.add(
            Diagnostic(
                "FD104",
                catalogue.get("FD104").severity,
                f"{path or '<root>'}: replaced by its rewritten graph ({why})",
                None,
                path or None,
            )
        )

    def cap_region(self, path: str) -> Region:
        return next(r for r in self.cap.regions if r.path == path)


def _refused(
    report: Report, where: str | None, node: str | None, message: str, source: str | None = None
) -> None:
    report.add(
        Diagnostic(
            "SW001", catalogue.get("SW001").severity, f"{where or node}: {message}", node, where, source
        )
    )


def _eval_outputs(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    m = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    if any(mod.training for mod in m.modules()):
        m = copy.deepcopy(m).eval()
    with torch.no_grad(), buffers_restored(m):
        return [t for t in torch.utils._pytree.tree_leaves(m(*inputs)) if isinstance(t, torch.Tensor)]


def measure(report: Report, original: Any, result: nn.Module, inputs: tuple[Any, ...] | None) -> None:
    """Verify exact rewrites; measure the output deviation of function-changing ones (eval mode)."""
    changed = [a for a in report.actions if a.kind != "skipped"]
    if inputs is None or not changed:
        if changed:
            report.extra["deviation"] = "not measured: no example inputs"
        return
    if all(a.exact for a in changed):
        check = verify(original, result, inputs, eval_mode=True)
        report.verification = {**check.to_dict(), "summary": check.summary()}
        if not check.passed:
            raise VerificationError(f"an exact rewrite failed verification: {check.summary()}")
        return
    before, after = _eval_outputs(original, inputs), _eval_outputs(result, inputs)
    worst_abs, worst_rel = 0.0, 0.0
    for a, b in zip(before, after):
        if a.shape != b.shape:
            report.extra["deviation"] = f"output shape changed from {tuple(a.shape)} to {tuple(b.shape)}"
            return
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        scale = float(a.double().abs().max()) if a.numel() else 0.0
        worst_abs = max(worst_abs, diff)
        worst_rel = max(worst_rel, diff / scale if scale else diff)
    report.extra["deviation"] = {"max_abs": worst_abs, "max_rel": worst_rel}
    report.add(
        Diagnostic(
            "SW002",
            catalogue.get("SW002").severity,
            f"the rewrite changes the eval-mode output: max abs deviation {worst_abs:.3g} (relative {worst_rel:.3g})",
        )
    )


def _capture(model: Any, example_inputs: Any, leaf_modules: Iterable[type | str]) -> Capture:
    cap = capture(model, example_inputs, leaf_modules=leaf_modules, check_trace=example_inputs is not None)
    if cap.example_inputs is not None:
        cap.ensure_shapes()
    return cap


def _opaque_modules(cap: Capture) -> list[tuple[str, nn.Module]]:
    """Norm modules called only from code no region covers (swapped/removed without a graph)."""
    return [(o.module_path, o.module) for o in opaque_norms(cap)]


def _insert_module_node(
    rw: Rewriter, region: Region, anchor: fx.Node, name: str, module: nn.Module
) -> fx.Node:
    rw.editor(region, anchor).set_module(name, module)
    graph = region.gm.graph
    with graph.inserting_after(anchor):
        new = graph.call_module(name, (anchor,))
    anchor.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return new


def norm_nodes(cap: Capture) -> list[tuple[Region, fx.Node, BNSite | OtherNormSite]]:
    """Every norm application in the captured graphs, in graph order (collected up front, so
    the graphs may be edited while iterating)."""
    bns, others = find_norms(cap)
    sites: list[tuple[Region, fx.Node, BNSite | OtherNormSite]] = [(s.region, s.call, s) for s in bns]  # type: ignore[misc]
    sites += [(o.region, o.node, o) for o in others]
    order = {id(n): i for r in cap.regions for i, n in enumerate(r.gm.graph.nodes)}
    regions = {r.path: k for k, r in enumerate(cap.regions)}
    return sorted(sites, key=lambda t: (regions[t[0].path], order[id(t[1])]))


def owned_norm(rw: Rewriter, region: Region, site: BNSite) -> tuple[str, Rest] | None:
    """For a functional batch_norm that a norm module applies to its own statistics as the
    first thing its forward does (a BatchNorm subclass with an activation, an in-place-ABN
    style module): the module's path and what the rest of its forward is. A rewrite then
    replaces that module by the new norm followed by the rest, keeping the activation."""
    call, node = site.call, site.node
    if call is None or node is None or call.op != "call_function" or (not region.path and not call.meta):
        return None
    stack = call.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    local = stack_path(list(stack.values())[-1][0])
    path = f"{region.path}.{local}" if region.path and local else (region.path or local)
    module = rw._module_at(path)
    attrs = {str(n.target).rpartition(".")[0] for n in call.all_input_nodes if n.op == "get_attr"}
    if module is None or not local or attrs != {local} or not norm_with_stats(module):
        return None
    index = ops_by_module(region)
    if site.input is not None and site.input in set(index.get(local, [])):
        return None  # the forward does something before normalizing: no module chain expresses it
    rest = rest_of(region, local, module, index, frozenset({call, node, *site.extra}))
    return (path, rest) if rest.module is not None else None


def collapse(region: Region, path: str, site: BNSite, rest: Rest) -> None:
    """Make the module's whole computation one call of the module at ``path`` in the region's
    graph, so the graph agrees with the module that replaces it there."""
    graph = region.gm.graph
    local = path[len(region.path) + 1 :] if region.path else path
    out = rest.output or site.node
    assert out is not None and site.input is not None
    with graph.inserting_after(out):
        new = graph.call_module(local, (site.input,))
    out.replace_all_uses_with(new)
    new.args = (site.input,)
    attrs: list[fx.Node] = []
    for n in reversed([site.call, site.node, *site.extra, *rest.nodes]):
        if n is not None and not n.users and not getattr(n, "_erased", False):
            attrs.extend(a for a in n.all_input_nodes if a.op == "get_attr")
            graph.erase_node(n)
    for a in attrs:  # the module's own tensors: it is replaced, they are gone with it
        if not a.users and not getattr(a, "_erased", False):
            graph.erase_node(a)


def _followed_by(new: nn.Module, rest: Rest) -> nn.Module:
    """``new`` then the rest of the replaced norm module's forward."""
    if isinstance(rest.module, nn.Identity):
        return new
    tail = list(rest.module) if isinstance(rest.module, nn.Sequential) else [rest.module]
    return nn.Sequential(new, *tail)


def _erase_bn(region: Region, site: BNSite, replacement: fx.Node) -> None:
    """Route the BatchNorm's users to ``replacement`` and drop the BatchNorm call."""
    assert site.node is not None and site.call is not None
    site.node.replace_all_uses_with(replacement)
    graph = region.gm.graph
    if site.node is not site.call:
        graph.erase_node(site.node)
    graph.erase_node(site.call)


# -- swap ----------------------------------------------------------------------------------------


def swap(
    model: Any,
    to: str,
    *,
    select: str | Iterable[str] | None = None,
    types: Iterable[str | type] | None = None,
    groups: int | None = None,
    ln_dims: str = "chw",
    example_inputs: Any = None,
    leaf_modules: Iterable[type | str] = (),
) -> RewriteResult:
    """Swap norm layers: ``to`` in gn, ln, in, bn, frozen, sync (BN -> X, or X -> BN for ``bn``).

    Learned scale and shift are kept wherever the target has them. ``ln_dims`` says what a
    LayerNorm normalizes: ``chw`` (channels and spatial dims, via GroupNorm(1, C)) or ``c`` (the
    channel dim at each position). The report says per layer whether the swap is exact in eval.
    """
    if to not in TARGETS:
        raise UsageError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    if groups is not None and groups < 1:
        raise UsageError("--groups must be a positive integer")
    selector = Selector.of(select, types)
    cap = _capture(model, example_inputs, leaf_modules)
    report = Report("swap", type(model).__name__, dialect=cap.dialect, opaque=list(cap.opaque))
    rw = Rewriter(
        cap,
        report,
        redo=lambda sub, x, at: (
            swap(
                sub,
                to,
                select=selector.under(at),
                groups=groups,
                ln_dims=ln_dims,
                example_inputs=x,
                leaf_modules=leaf_modules,
            ).model
        ),
    )
    done: set[str] = set()
    for region, node, _site in norm_nodes(cap):
        _swap_node(rw, report, region, node, to, selector, groups, ln_dims, done)
    for path, module in _opaque_modules(cap):
        if path in done:
            continue
        kind = type(module).__name__
        if not selector.matches(path, kind):
            continue
        shape = cap.recording.out_shapes.get(path) if cap.recording is not None else None
        _swap_module_without_graph(rw, report, path, module, to, groups, ln_dims, shape)
    result = rw.build()
    measure(report, model, result, cap.example_inputs)
    return RewriteResult(result, report)


def _swap_node(
    rw: Rewriter,
    report: Report,
    region: Region,
    node: fx.Node,
    to: str,
    selector: Selector,
    groups: int | None,
    ln_dims: str,
    done: set[str],
) -> None:
    site = bn_site(region, node)
    other = None if site is not None else other_norm_site(region, node)
    if site is None and other is None:
        return
    path = region.module_path(node)
    kind = site.kind if site is not None else other.kind  # type: ignore[union-attr]
    if not selector.matches(path, kind):
        return
    module_node = node.op == "call_module"
    if module_node and path in done:
        return
    inp = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    shape = node_shape(inp) if inp is not None else None
    try:
        if to == "bn":
            if site is not None:
                built = from_batchnorm(site, "bn", shape=shape)
            elif not module_node:
                raise SwapRefused(
                    f"functional {kind} has no stored affine to carry over; swap it in the model code"
                )
            else:
                built = to_batchnorm(region.gm.get_submodule(str(node.target)), shape=shape)
        else:
            if site is None:
                return  # only BatchNorms are swapped to other norms
            if site.module is not None and to == "sync" and isinstance(site.module, nn.SyncBatchNorm):
                return
            built = from_batchnorm(site, to, shape=shape, groups=groups, ln_dims=ln_dims)
    except SwapRefused as exc:
        _refused(report, path, region.qualify(node.name), str(exc), source_line(node))
        return
    owned = owned_norm(rw, region, site) if (site is not None and not module_node) else None
    if owned is not None:
        path, rest = owned
        if path in done:
            return
        done.add(path)
        collapse(region, path, site, rest)
        rw.replace_module(path, _followed_by(built.module, rest))
        if rest.kept:
            built.note += f"; keeps the rest of its forward ({rest.describe()})"
        if rest.graph:
            rw._graph_note(
                path, f"the rest of its forward ({rest.describe()}) is no chain of its own modules"
            )
    elif module_node:
        done.add(path or "")
        rw.replace_module(path or "", built.module)
    else:
        assert site is not None
        name = rw.editor(region, node).free_name(f"{node.name}_{to}")
        new = _insert_module_node(rw, region, site.input, name, built.module)  # type: ignore[arg-type]
        _erase_bn(region, site, new)
    report.actions.append(
        Action(
            "swap",
            region.qualify(node.name),
            path,
            f"{kind} -> {type(built.module).__name__}: {built.note}",
            exact=built.exact,
        )
    )


def _swap_module_without_graph(
    rw: Rewriter,
    report: Report,
    path: str,
    module: nn.Module,
    to: str,
    groups: int | None,
    ln_dims: str,
    shape: tuple[int, ...] | None,
) -> None:
    """A norm called from untraceable code: swap the module itself; its input shape is the one
    the capture's eager pass recorded (a norm's output has its input's shape), if it ran."""
    try:
        if to == "bn":
            built = to_batchnorm(module, shape=shape)
        else:
            site = module_bn_site(module)
            if site is None:
                return
            built = from_batchnorm(site, to, shape=shape, groups=groups, ln_dims=ln_dims)
    except SwapRefused as exc:
        _refused(report, path, None, f"{exc} (called from untraceable code)")
        return
    rw.replace_module(path, built.module)
    report.actions.append(
        Action(
            "swap",
            None,
            path,
            f"{type(module).__name__} -> {type(built.module).__name__}: {built.note}",
            exact=built.exact,
        )
    )


# -- insert --------------------------------------------------------------------------------------

_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.LeakyReLU,
    nn.Hardswish,
    nn.ELU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
)
_ACT_FUNCS = {
    torch.relu,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    torch.nn.functional.gelu,
    torch.nn.functional.silu,
    torch.nn.functional.leaky_relu,
    torch.nn.functional.hardswish,
    torch.sigmoid,
    torch.tanh,
    torch.ops.aten.relu.default,
    torch.ops.aten.gelu.default,
    torch.ops.aten.silu.default,
    torch.ops.aten.hardtanh.default,
}


def _is_activation(region: Region, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(region.gm.get_submodule(str(node.target)), _ACTIVATIONS)
    if node.op == "call_method":
        return node.target in ("relu", "sigmoid", "tanh")
    return node.op == "call_function" and node.target in _ACT_FUNCS


def _is_norm(region: Region, node: fx.Node) -> bool:
    if node.op not in ("call_module", "call_function"):
        return False
    return bn_site(region, node) is not None or other_norm_site(region, node) is not None


def identity_batchnorm(channels: int, rank: int, like: torch.Tensor) -> nn.Module:
    """A BatchNorm that is the identity in eval mode: scale 1, shift 0, mean 0, var 1 - eps."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    bn = cls(channels)
    with torch.no_grad():
        bn.running_var.fill_(1.0 - bn.eps)
    return bn.to(device=like.device, dtype=like.dtype)


def insert(
    model: Any,
    after: str | Iterable[str] = "conv,linear",
    *,
    norm: str = "bn",
    position: str = "pre-act",
    select: str | Iterable[str] | None = None,
    types: Iterable[str | type] | None = None,
    example_inputs: Any = None,
    leaf_modules: Iterable[type | str] = (),
) -> RewriteResult:
    """Add a norm after every matching conv/linear that lacks one.

    ``position="pre-act"`` puts it right after the layer (conv -> BN -> act), ``"post-act"`` after
    the activation that follows it. An inserted BatchNorm is the identity in eval mode (verified);
    ``norm="gn"`` inserts GroupNorm, which changes the function (deviation reported).
    """
    kinds = {k.strip() for k in (after.split(",") if isinstance(after, str) else after) if k.strip()}
    if not kinds or kinds - {"conv", "linear", "conv_transpose"}:
        raise UsageError(f"--after {after!r}: expected a comma list of conv, conv_transpose, linear")
    if "conv" in kinds:
        kinds.add("conv_transpose")
    if norm not in ("bn", "gn"):
        raise UsageError(f"--norm {norm!r}: expected bn or gn")
    if position not in ("pre-act", "post-act"):
        raise UsageError(f"--position {position!r}: expected pre-act or post-act")
    selector = Selector.of(select, types)
    cap = _capture(model, example_inputs, leaf_modules)
    report = Report("insert", type(model).__name__, dialect=cap.dialect, opaque=list(cap.opaque))
    rw = Rewriter(
        cap,
        report,
        redo=lambda sub, x, at: (
            insert(
                sub,
                after=after,
                norm=norm,
                position=position,
                select=selector.under(at),
                example_inputs=x,
                leaf_modules=leaf_modules,
            ).model
        ),
    )
    for region in cap.regions:
        for node in list(region.gm.graph.nodes):
            if node.op not in ("call_module", "call_function"):
                continue
            layer = layer_site(region, node)
            if layer is None or layer.kind not in kinds or layer.weight is None:
                continue
            path = layer.module_path
            kind = type(layer.module).__name__ if layer.module is not None else str(layer.kind)
            if not selector.matches(path, kind):
                continue
            _insert_after(rw, report, region, layer, norm, position)
    result = rw.build()
    measure(report, model, result, cap.example_inputs)
    return RewriteResult(result, report)


def _insert_after(rw: Rewriter, report: Report, region: Region, layer: Any, norm: str, position: str) -> None:
    node = layer.node
    label = layer.module_path or layer.name
    anchor = node
    if position == "post-act":
        users = list(node.users)
        if len(users) != 1 or not _is_activation(region, users[0]):
            _refused(report, layer.module_path, layer.name, "no single activation follows it (post-act)")
            return
        anchor = users[0]
    if any(_is_norm(region, u) for u in anchor.users):
        return  # already normalized: nothing to insert
    weight = layer.weight
    channels = int(weight.shape[1] * layer.groups if layer.kind == "conv_transpose" else weight.shape[0])
    if layer.kind == "linear":
        shape = node_shape(anchor)
        if shape is None:
            _refused(
                report, layer.module_path, layer.name, "output rank unknown for a Linear: pass example inputs"
            )
            return
        if len(shape) != 2:
            _refused(
                report,
                layer.module_path,
                layer.name,
                f"Linear output has rank {len(shape)}; BatchNorm1d needs (N, C)",
            )
            return
        rank = 2
    else:
        rank = weight.dim()
    if norm == "bn":
        module: nn.Module = identity_batchnorm(channels, rank, weight)
        exact, note = True, "identity in eval mode (scale 1, shift 0, mean 0, var 1 - eps)"
    else:
        g = default_groups(channels)
        module = nn.GroupNorm(g, channels).to(device=weight.device, dtype=weight.dtype)
        exact, note = False, f"GroupNorm({g}, {channels}) normalizes per sample"
    module.train(layer.module.training if layer.module is not None else region.gm.training)
    name = (str(node.target) if node.op == "call_module" else node.name) + "_norm"
    while _exists(region.gm, name):
        name += "_"
    _insert_module_node(rw, region, anchor, name, module)
    report.actions.append(
        Action(
            "insert",
            region.qualify(anchor.name),
            label,
            f"{type(module).__name__}({channels}) after {label} ({position}): {note}",
            target=name,
            exact=exact,
        )
    )


def _exists(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


# -- remove --------------------------------------------------------------------------------------


def remove(
    model: Any,
    *,
    select: str | Iterable[str] | None = None,
    types: Iterable[str | type] | None = None,
    example_inputs: Any = None,
    leaf_modules: Iterable[type | str] = (),
) -> RewriteResult:
    """Strip the selected norm layers (all of them without a selector); report the output change."""
    selector = Selector.of(select, types)
    cap = _capture(model, example_inputs, leaf_modules)
    report = Report("remove", type(model).__name__, dialect=cap.dialect, opaque=list(cap.opaque))
    rw = Rewriter(
        cap,
        report,
        redo=lambda sub, x, at: (
            remove(sub, select=selector.under(at), example_inputs=x, leaf_modules=leaf_modules).model
        ),
    )
    done: set[str] = set()
    for region in cap.regions:
        for node in list(region.gm.graph.nodes):
            if node.op not in ("call_module", "call_function"):
                continue
            site = bn_site(region, node)
            other = None if site is not None else other_norm_site(region, node)
            if site is None and other is None:
                continue
            path = region.module_path(node)
            kind = site.kind if site is not None else other.kind  # type: ignore[union-attr]
            if not selector.matches(path, kind):
                continue
            if node.op == "call_module":
                if path not in done:
                    done.add(path or "")
                    rw.replace_module(path or "", nn.Identity())
                    report.actions.append(
                        Action("remove", region.qualify(node.name), path, f"{kind} removed", exact=False)
                    )
                continue
            assert site is not None and site.input is not None
            owned = owned_norm(rw, region, site)
            if owned is not None:
                owner, rest = owned
                if owner not in done:
                    done.add(owner)
                    collapse(region, owner, site, rest)
                    rw.replace_module(owner, rest.module)
                    kept = f"; keeps the rest of its forward ({rest.describe()})" if rest.kept else ""
                    report.actions.append(
                        Action(
                            "remove", region.qualify(node.name), owner, f"{kind} removed{kept}", exact=False
                        )
                    )
                continue
            rw.editor(region, node)
            site.node.replace_all_uses_with(site.input)
            graph = region.gm.graph
            if site.node is not site.call:
                graph.erase_node(site.node)
            graph.erase_node(site.call)
            report.actions.append(
                Action("remove", region.qualify(node.name), path, f"{kind} removed", exact=False)
            )
    for path, module in _opaque_modules(cap):
        if path not in done and selector.matches(path, type(module).__name__):
            rw.replace_module(path, nn.Identity())
            report.actions.append(
                Action("remove", None, path, f"{type(module).__name__} removed", exact=False)
            )
    result = rw.build()
    measure(report, model, result, cap.example_inputs)
    return RewriteResult(result, report)


# -- fix -----------------------------------------------------------------------------------------

FIXABLE = ("BN001",)


def fix(
    model: Any,
    codes: Iterable[str] | str = FIXABLE,
    *,
    select: str | Iterable[str] | None = None,
    types: Iterable[str | type] | None = None,
    example_inputs: Any = None,
    leaf_modules: Iterable[type | str] = (),
) -> RewriteResult:
    """Apply the fixes analysis rules offer. BN001: drop a conv/linear bias that feeds a
    BatchNorm and absorb it into the BatchNorm's running mean (exact in eval and in training)."""
    wanted = {c.strip().upper() for c in ([codes] if isinstance(codes, str) else codes)}
    unknown = wanted - set(FIXABLE)
    if unknown:
        raise UsageError(f"no automatic fix for {', '.join(sorted(unknown))}; fixable: {', '.join(FIXABLE)}")
    selector = Selector.of(select, types)
    cap = _capture(model, example_inputs, leaf_modules)
    report = Report("fix", type(model).__name__, dialect=cap.dialect, opaque=list(cap.opaque))
    rw = Rewriter(
        cap,
        report,
        redo=lambda sub, x, at: (
            fix(sub, codes, select=selector.under(at), example_inputs=x, leaf_modules=leaf_modules).model
        ),
    )
    for region in cap.regions:
        calls: dict[str, int] = {}
        for n in region.gm.graph.nodes:
            if n.op == "call_module":
                calls[str(n.target)] = calls.get(str(n.target), 0) + 1
        for node in list(region.gm.graph.nodes):
            if node.op not in ("call_module", "call_function"):
                continue
            site = bn_site(region, node)
            if site is None or site.input is None or len(value_readers(site.input)) != 1:
                continue
            layer = layer_site(region, site.input)
            if layer is None or layer.bias is None:
                continue
            if not selector.matches(site.module_path, site.kind) and not selector.matches(
                layer.module_path, type(layer.module).__name__ if layer.module is not None else layer.kind
            ):
                continue
            _absorb_bias(rw, report, region, site, layer, calls)
    result = rw.build()
    measure(report, model, result, cap.example_inputs)
    return RewriteResult(result, report)


def _absorb_bias(
    rw: Rewriter, report: Report, region: Region, site: Any, layer: Any, calls: dict[str, int]
) -> None:
    label = layer.module_path or layer.name
    owned = owned_norm(rw, region, site) if site.module is None else None
    owner, owner_path = (rw._module_at(owned[0]), owned[0]) if owned else (site.module, site.module_path)
    if layer.module is None or owner is None:
        _refused(
            report, label, layer.name, "BN001 fix needs module layers (functional convs/BNs are left alone)"
        )
        return
    if calls.get(str(layer.node.target), 0) > 1 or (
        site.module is not None and calls.get(str(site.call.target), 0) > 1
    ):
        _refused(
            report,
            label,
            layer.name,
            "module called at several places: dropping its bias would change the other calls",
        )
        return
    if layer.bias.shape[0] != site.num_features:
        _refused(report, label, layer.name, "bias and BatchNorm channel counts differ")
        return
    conv = shallow_copy(layer.module)
    conv._parameters["bias"] = None
    bn = shallow_copy(owner)
    if site.running_mean is not None:
        bn._buffers["running_mean"] = (
            site.running_mean.detach() - layer.bias.detach().to(site.running_mean.dtype)
        ).clone()
    rw.replace_module(layer.module_path, conv)
    rw.replace_module(owner_path, bn)
    report.actions.append(
        Action(
            "fix",
            layer.name,
            label,
            f"BN001: bias of {label} dropped and absorbed into {owner_path}.running_mean",
            target=owner_path,
            exact=True,
            code="BN001",
        )
    )
