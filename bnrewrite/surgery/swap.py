"""``swap``: BatchNorm <-> GroupNorm / LayerNorm / InstanceNorm, frozen BN, SyncBatchNorm."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import fx, nn

from bnrewrite.capture.capture_model import Region
from bnrewrite.diagnostics import Action, Report
from bnrewrite.errors import UsageError
from bnrewrite.fold import RewriteResult
from bnrewrite.select import Selector
from bnrewrite.semantics.norms import (
    BNSite,
    module_bn_site,
)
from bnrewrite.semantics.ops import node_shape, source_line
from bnrewrite.surgery.norm_factory import TARGETS, Built, SwapRefused, from_batchnorm, to_batchnorm
from bnrewrite.surgery.rewriter import (
    Rewriter,
    _capture,
    _erase_bn,
    _followed_by,
    _insert_module_node,
    _opaque_modules,
    _refused,
    collapse,
    finish,
    norm_nodes,
    owned_norm,
    selected_norm,
)

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
    dry_run: bool = False,
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
    return finish(rw, report, model, dry_run)


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
    selected = selected_norm(region, node, selector)
    if selected is None:
        return
    site, path, kind = selected
    module_node = node.op == "call_module"
    if module_node and path in done:
        return
    inp = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    shape = node_shape(inp) if inp is not None else None
    try:
        built = _build(region, node, site, kind, to, shape, groups, ln_dims)
    except SwapRefused as exc:
        _refused(report, path, region.qualify(node.name), str(exc), source_line(node))
        return
    if built is None:
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
    detail = f"{kind} -> {type(built.module).__name__}: {built.note}"
    report.actions.append(Action("swap", region.qualify(node.name), path, detail, exact=built.exact))


def _build(
    region: Region,
    node: fx.Node,
    site: BNSite | None,
    kind: str,
    to: str,
    shape: tuple[int, ...] | None,
    groups: int | None,
    ln_dims: str,
) -> Built | None:
    """The new norm for the one ``node`` applies (None: nothing to swap); SwapRefused with why."""
    module_node = node.op == "call_module"
    if to == "bn":
        if site is not None:
            return from_batchnorm(site, "bn", shape=shape)
        if not module_node:
            raise SwapRefused(
                f"functional {kind} has no stored affine to carry over; swap it in the model code"
            )
        return to_batchnorm(region.gm.get_submodule(str(node.target)), shape=shape)
    if site is None:
        return None  # only BatchNorms are swapped to other norms
    if site.module is not None and to == "sync" and isinstance(site.module, nn.SyncBatchNorm):
        return None
    return from_batchnorm(site, to, shape=shape, groups=groups, ln_dims=ln_dims)


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
