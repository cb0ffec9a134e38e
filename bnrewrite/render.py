"""Render reports for people (rich tables) and pipelines (JSON)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from bnrewrite.diagnostics import Report, Severity

_SEV_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
_VERDICT_STYLE = {
    "fold-into-preceding": "green",
    "fold-into-following": "green",
    "scale-shift": "cyan",
    "not-foldable": "red",
    "not-applicable": "dim",
}


def to_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)


def _t(value: Any, style: str = "") -> Text:
    """Text shown literally: messages, module paths and model text are never markup (a
    ``layers[0]`` path or a ``pip install 'bnrewrite[onnx]'`` hint keeps its brackets)."""
    return Text(str(value), style=style)


def describe_proof(proof: dict[str, Any]) -> str:
    """The proof's outcome in words."""
    if proof.get("passed") is None:
        return proof.get("note") or "not run"
    runs = f"{proof.get('forward_passes', 0)} forward passes"
    if proof.get("float64_passes"):
        runs += f" and {proof['float64_passes']} float64 pass"
    text = (
        f"{'passed' if proof.get('passed') else 'FAILED'}: {proof.get('local_checks', 0)} local checks, "
        f"{runs}; largest output difference {proof.get('max_abs_error', 0.0):.3g} "
        f"(tolerance {proof.get('tolerance', 0.0):.3g}) at {proof.get('worst_output') or '-'}"
    )
    if proof.get("judged_against_float64"):
        text += f"; {proof['judged_against_float64']}"
    if proof.get("undone"):
        text += f"; undone: {', '.join(proof['undone'])}"
    if proof.get("not_run"):
        text += f"; not reached by the example inputs: {', '.join(proof['not_run'])}"
    return text


def render_report(report: Report, console: Console) -> None:
    if report.opaque:
        t = Table(title="Parts that could not be traced", title_justify="left")
        for col in ("module", "type", "reason"):
            t.add_column(col, overflow="fold")
        for o in report.opaque:
            t.add_row(_t(o.module_path or "<root>"), _t(o.module_type), _t(o.reason))
        console.print(t)
    if report.norms:
        console.print(_norms_table(report))
    elif report.command == "analyze":
        console.print("No normalization layers found.")
    if report.actions:
        t = Table(title=f"Changes ({len(report.actions)})", title_justify="left")
        for col in ("layer", "change", "into", "detail"):
            t.add_column(col, overflow="fold")
        for a in report.actions:
            t.add_row(_t(a.module_path or a.node or "?"), _t(a.kind), _t(a.target or "-"), _t(a.detail))
        console.print(t)
    if report.diagnostics:
        t = Table(title=f"Findings ({len(report.diagnostics)})", title_justify="left")
        for col in ("severity", "code", "where", "message", "source"):
            t.add_column(col, overflow="fold")
        for d in report.diagnostics:
            t.add_row(
                _t(d.severity.value, _SEV_STYLE[d.severity]),
                _t(d.code),
                _t(d.module_path or d.node or "-"),
                _t(d.message),
                _t(d.source or "-"),
            )
        console.print(t)
    elif report.command == "analyze":
        console.print(_t("No findings.", "green"))
    if report.verification is not None:
        v = report.verification
        style = "green" if v.get("passed") else "bold red"
        console.print(Text.assemble("Verification: ", (str(v.get("summary", "")), style)))
    if report.plan is not None:
        console.print(_t(f"plan ({report.plan.edits} edits, nothing changed):"))
        for step in report.plan.steps:
            console.print(_t(f"  {step.describe()}"))
    for key, value in report.extra.items():
        if key == "branch_sets":
            if value:
                console.print(_branch_sets_table(value))
            continue
        if key in ("precision", "precision_before"):
            if value:
                console.print(
                    _precision_table(value, "before equalizing" if key == "precision_before" else "")
                )
            continue
        text = describe_proof(value) if key == "proof" and isinstance(value, dict) else as_text(value)
        console.print(_t(f"{key}: {text}"))


def as_text(value: Any) -> str:
    """A report value as one line of words: ``key value`` pairs for a mapping, items joined by
    commas for a list; never a Python repr of a dict."""
    if isinstance(value, dict):
        return "; ".join(f"{k} {as_text(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, (list, tuple)):
        return ", ".join(as_text(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _precision_table(entries: list[dict[str, Any]], when: str = "") -> Table:
    """One row per folded layer: what its weights will be in low precision."""
    title = f"Folded weights in low precision ({len(entries)} layers{', ' + when if when else ''})"
    t = Table(title=title, title_justify="left")
    for col in (
        "layer",
        "|w| max",
        "channel spread",
        "int8 SQNR per-tensor / per-channel",
        "fp16 overflow",
        "subnormal",
    ):
        t.add_column(col, overflow="fold")
    for e in entries:
        db = e["int8_sqnr_db"]
        fmt = lambda v: "inf" if v is None else f"{v:.1f} dB"  # noqa: E731
        t.add_row(
            _t(e["layer"]), _t(f"{e['weight_absmax']:.3g}"), _t(f"{e['channel_spread']:.3g}x"),
            _t(f"{fmt(db['per_tensor'])} / {fmt(db['per_channel'])}"), _t(str(e["fp16_overflow"])),
            _t(str(e["subnormal"])),
        )  # fmt: skip
    return t


def _norms_table(report: Report) -> Table:
    """One row per norm layer: where it sits, its verdict and the reason."""
    t = Table(title=f"Normalization layers ({len(report.norms)})", title_justify="left")
    for col in ("layer", "kind", "before", "after", "verdict", "reason"):
        t.add_column(col, overflow="fold")
    for n in report.norms:
        reason = _t(n.reason)
        if n.reason_code and f"({n.reason_code})" not in n.reason:
            reason.append(f" ({n.reason_code})", style="dim")
        t.add_row(
            _t(n.module_path or n.node or "?"),
            _t(n.kind),
            _t(n.before or "-"),
            _t(", ".join(n.after) or "-"),
            _t(n.verdict, _VERDICT_STYLE.get(n.verdict, "")),
            reason,
        )
    return t


def _branch_sets_table(sets: list[dict[str, Any]]) -> Table:
    """One row per sum of parallel branches that read one tensor: merged or not, and why."""
    t = Table(title=f"Branch sets ({len(sets)})", title_justify="left")
    for col in ("module", "branches", "verdict", "reason"):
        t.add_column(col, overflow="fold")
    for s in sets:
        verdict = "merge" if s["verdict"] == "merge" else "kept"
        t.add_row(
            _t(s["module"]),
            _t("; ".join(s["branches"])),
            _t(verdict, "green" if verdict == "merge" else "yellow"),
            _t(s["reason"]),
        )
    return t


def render_summary(outcomes: list[tuple[str, Any, str | None]], lint: Any, console: Console) -> None:
    """One row per analyzed model: norms, folds, findings by severity, and pass/fail."""
    table = Table(title=f"Summary ({len(outcomes)} models)")
    for col in ("model", "norms", "foldable", "errors", "warnings", "info", "status"):
        table.add_column(col)
    for model, report, error in outcomes:
        if report is None:
            table.add_row(
                _t(model), "", "", "", "", "", Text.assemble(("could not be analyzed", "red"), f": {error}")
            )
            continue
        count = {
            s: sum(d.severity.value == s for d in report.diagnostics) for s in ("error", "warning", "info")
        }
        foldable = sum(n.verdict.startswith("fold") for n in report.norms)
        status = _t("fail", "red") if lint.fails(report) else _t("pass", "green")
        table.add_row(
            _t(model),
            str(len(report.norms)),
            str(foldable),
            str(count["error"]),
            str(count["warning"]),
            str(count["info"]),
            status,
        )
    console.print(table)
