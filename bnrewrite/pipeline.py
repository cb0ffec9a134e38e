"""Workflows that combine the building blocks the way the CLI and pipelines use them."""

from __future__ import annotations

import os
from typing import Any

from bnrewrite.diagnostics import Report
from bnrewrite.errors import UsageError, VerificationError
from bnrewrite.export import export
from bnrewrite.files import MODEL_FORMATS, check_output, format_of
from bnrewrite.fold import fold
from bnrewrite.graph_files import diff_view, graph_view, to_dot, write_dot_and_svg
from bnrewrite.load import Loaded
from bnrewrite.verify import verify


def fold_and_write(
    loaded: Loaded,
    output: str | os.PathLike[str],
    inputs: tuple[Any, ...] | None,
    *,
    verify: bool = False,
    eval_mode: bool = False,
    fmt: str | None = None,
    dynamic_batch: bool = False,
    graph: str | os.PathLike[str] | None = None,
    force: bool = False,
    select: Any = None,
    types: Any = None,
    leaf_modules: Any = (),
    bn_to_affine: bool = False,
    speed_check: bool = True,
    merge_branches: bool = True,
    precision: Any = None,
    target_dtype: Any = None,
    norm_affine: bool = False,
) -> Report:
    """Fold, optionally verify, and write; nothing is written unless every step succeeded."""
    kind = format_of(output, fmt)
    check_output(output, force=force)
    if graph is not None:
        check_output(graph, force=force)
    if kind in MODEL_FORMATS and inputs is None and kind != "pt":
        raise UsageError(f"writing .{kind} needs example inputs: pass --input-shape (e.g. 1,3,224,224)")
    options = {
        "eval_mode": eval_mode,
        "select": select,
        "types": types,
        "leaf_modules": leaf_modules,
        "bn_to_affine": bn_to_affine,
        "speed_check": speed_check,
        "merge_branches": merge_branches,
        "precision": precision,
        "target_dtype": target_dtype,
        "norm_affine": norm_affine,
    }
    return _fold_and_write(loaded, output, inputs, verify, kind, dynamic_batch, graph, force, options)


def _fold_and_write(
    loaded: Loaded,
    output: str | os.PathLike[str],
    inputs: tuple[Any, ...] | None,
    do_verify: bool,
    kind: str,
    dynamic_batch: bool,
    graph: str | os.PathLike[str] | None,
    force: bool,
    options: dict[str, Any],
) -> Report:
    result = fold(loaded.model, inputs, record_sources=True, **options)
    eval_mode = options["eval_mode"]
    report = result.report
    report.model = loaded.source
    if do_verify:
        if inputs is None:
            raise UsageError("--verify needs example inputs: pass --input-shape")
        check = verify(loaded.model, result.model, inputs, eval_mode=eval_mode)
        report.verification = {**check.to_dict(), "summary": check.summary()}
        if not check.passed:
            raise VerificationError(f"verification failed, nothing written: {check.summary()}")
    info = export(
        result.model, output, inputs, fmt=kind, force=force, dynamic_batch=dynamic_batch, roundtrip=do_verify
    )
    report.extra["output"] = info["path"]
    if "read_back" in info:
        report.extra["read_back"] = info["read_back"]
    if "onnxruntime_check" in info:
        report.extra["onnxruntime_check"] = info["onnxruntime_check"]
    if graph is not None:
        before, after = graph_view(loaded.model), graph_view(result.model)
        targets = [t.strip() for a in report.actions if a.target for t in a.target.split(",")]
        union, status, edges = diff_view(before, after, targets)
        dot = to_dot(union, status=status, edge_status=edges, title="fold: before and after")
        report.extra["graph"] = write_dot_and_svg(
            dot, graph, force=force, view=union, status=status, edge_status=edges
        )
    return report


def rewrite_to_file(
    loaded: Loaded,
    output: str | os.PathLike[str],
    inputs: tuple[Any, ...] | None,
    rewrite: Any,
    *,
    fmt: str | None = None,
    dynamic_batch: bool = False,
    force: bool = False,
    write: bool = True,
) -> Report:
    """Run ``rewrite(model) -> RewriteResult`` and write the result; nothing is written on failure."""
    kind = format_of(output, fmt)
    check_output(output, force=force)
    if write and kind in MODEL_FORMATS and inputs is None:
        raise UsageError(f"writing .{kind} needs example inputs: pass --input-shape")
    result = rewrite(loaded.model)
    report = result.report
    report.model = loaded.source
    if write:
        info = export(result.model, output, inputs, fmt=kind, force=force, dynamic_batch=dynamic_batch)
        report.extra["output"] = info["path"]
    return report
