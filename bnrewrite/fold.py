"""`bnrewrite.fold`: capture, fold every region, reassemble the model, report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from torch import nn

from . import codes
from .diagnostics import Diagnostic, Report
from .graph.capture import Capture, capture
from .graph.edit import Editor, shallow_copy
from .graph.norms import opaque_norms, other_norm_family
from .passes.fold_bn import fold_region
from .passes.fold_plan import rank_lookup
from .select import Selector


class RewriteResult(NamedTuple):
    """A rewritten model and the report of what was changed; unpacks as ``model, report``."""

    model: nn.Module
    report: Report


def assemble(cap: Capture, *, inplace: bool = False) -> nn.Module:
    """The rewritten model: the single graph, or the original tree with its regions replaced."""
    if cap.whole or not cap.regions:
        return cap.regions[0].gm if cap.regions else cap.model
    root = cap.model if inplace else shallow_copy(cap.model)
    editor = Editor(root, inplace=inplace)
    for region in cap.regions:
        editor.set_module(region.path, region.gm)
    return root


def opaque_diagnostics(cap: Capture) -> list[Diagnostic]:
    """FD203 for every BatchNorm-like module that only untraceable code calls."""
    return [
        Diagnostic(
            "FD203",
            codes.get("FD203").severity,
            f"{o.module_path}: not folded: called from untraceable code in {o.where}: {o.reason}",
            None,
            o.module_path,
        )
        for o in opaque_norms(cap)
        if other_norm_family(o.module) is None
    ]


def fold(
    model: Any,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    eval_mode: bool = False,
    leaf_modules: Iterable[type | str] = (),
    record_sources: bool = False,
    check_trace: bool = True,
    select: str | Iterable[str] | None = None,
    types: Iterable[str | type] | None = None,
    cap: Capture | None = None,
) -> RewriteResult:
    """Fold every foldable BatchNorm of ``model`` into neighbouring weights.

    Returns the rewritten model (a ``GraphModule``, or the original module tree with its
    traceable parts replaced) and a report of every fold and every skip with its reason. The
    input model is not modified unless ``inplace=True``. ``eval_mode=True`` folds the eval-mode
    behaviour of BatchNorms that are in training mode. With example inputs, ``check_trace`` (on
    by default) runs each traced graph against the eager model first and falls back to the
    traceable parts when tracing silently changed the computation. ``select`` (dotted-path
    globs) and ``types`` (kinds such as ``BatchNorm2d``, ``F.batch_norm``) limit which
    BatchNorms are folded.
    """
    selector = Selector.of(select, types) if (select or types) else None
    if cap is None:
        cap = capture(
            model,
            example_inputs,
            leaf_modules=leaf_modules,
            record_sources=record_sources,
            check_trace=check_trace,
        )
    report = Report("fold", type(model).__name__, dialect=cap.dialect, opaque=list(cap.opaque))
    rank_of = rank_lookup(cap)
    for region in cap.regions:
        actions, diagnostics = fold_region(
            region, rank_of, eval_mode=eval_mode, inplace=inplace, selector=selector
        )
        report.actions.extend(actions)
        report.diagnostics.extend(diagnostics)
    report.diagnostics.extend(opaque_diagnostics(cap))
    return RewriteResult(assemble(cap, inplace=inplace), report)
