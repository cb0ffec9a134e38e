"""``remove``: strip the selected norm layers, keeping whatever else their forward does."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import fx, nn

from bnrewrite.capture.capture_model import Region
from bnrewrite.diagnostics import Action, Report
from bnrewrite.fold import RewriteResult
from bnrewrite.select import Selector
from bnrewrite.surgery.rewriter import (
    Rewriter,
    _capture,
    _opaque_modules,
    collapse,
    finish,
    owned_norm,
    selected_norm,
)

# -- remove --------------------------------------------------------------------------------------


def remove(
    model: Any,
    *,
    select: str | Iterable[str] | None = None,
    types: Iterable[str | type] | None = None,
    example_inputs: Any = None,
    leaf_modules: Iterable[type | str] = (),
    dry_run: bool = False,
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
            if node.op in ("call_module", "call_function"):
                _remove_node(rw, report, region, node, selector, done)
    for path, module in _opaque_modules(cap):
        if path not in done and selector.matches(path, type(module).__name__):
            rw.replace_module(path, nn.Identity())
            report.actions.append(
                Action("remove", None, path, f"{type(module).__name__} removed", exact=False)
            )
    return finish(rw, report, model, dry_run)


def _remove_node(
    rw: Rewriter, report: Report, region: Region, node: fx.Node, selector: Selector, done: set[str]
) -> None:
    """Remove the norm ``node`` applies, if selected: a module becomes ``nn.Identity`` (or the
    rest of its forward), a functional norm leaves the graph."""
    selected = selected_norm(region, node, selector)
    if selected is None:
        return
    site, path, kind = selected
    name = region.qualify(node.name)
    if node.op == "call_module":
        if path not in done:
            done.add(path or "")
            rw.replace_module(path or "", nn.Identity())
            report.actions.append(Action("remove", name, path, f"{kind} removed", exact=False))
        return
    assert site is not None and site.input is not None
    owned = owned_norm(rw, region, site)
    if owned is not None:
        owner, rest = owned
        if owner not in done:
            done.add(owner)
            collapse(region, owner, site, rest)
            rw.replace_module(owner, rest.module)
            kept = f"; keeps the rest of its forward ({rest.describe()})" if rest.kept else ""
            report.actions.append(Action("remove", name, owner, f"{kind} removed{kept}", exact=False))
        return
    rw.editor(region, node)
    site.node.replace_all_uses_with(site.input)
    graph = region.gm.graph
    if site.node is not site.call:
        graph.erase_node(site.node)
    graph.erase_node(site.call)
    report.actions.append(Action("remove", name, path, f"{kind} removed", exact=False))
