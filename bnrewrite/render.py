"""Render reports for people (rich tables) and pipelines (JSON)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from .diagnostics import Report, Severity

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


def render_report(report: Report, console: Console) -> None:
    if report.opaque:
        t = Table(title="Parts that could not be traced", title_justify="left")
        for col in ("module", "type", "reason"):
            t.add_column(col, overflow="fold")
        for o in report.opaque:
            t.add_row(o.module_path or "<root>", o.module_type, o.reason)
        console.print(t)
    if report.norms:
        t = Table(title=f"Normalization layers ({len(report.norms)})", title_justify="left")
        for col in ("layer", "kind", "before", "after", "verdict", "reason"):
            t.add_column(col, overflow="fold")
        for n in report.norms:
            style = _VERDICT_STYLE.get(n.verdict, "")
            t.add_row(
                n.module_path or n.node or "?",
                n.kind,
                n.before or "-",
                ", ".join(n.after) or "-",
                f"[{style}]{n.verdict}[/]",
                f"{n.reason} [dim]({n.reason_code})[/]"
                if n.reason_code and f"({n.reason_code})" not in n.reason
                else n.reason,
            )
        console.print(t)
    elif report.command == "analyze":
        console.print("No normalization layers found.")
    if report.actions:
        t = Table(title=f"Changes ({len(report.actions)})", title_justify="left")
        for col in ("layer", "change", "into", "detail"):
            t.add_column(col, overflow="fold")
        for a in report.actions:
            t.add_row(a.module_path or a.node or "?", a.kind, a.target or "-", a.detail)
        console.print(t)
    if report.diagnostics:
        t = Table(title=f"Findings ({len(report.diagnostics)})", title_justify="left")
        for col in ("severity", "code", "where", "message", "source"):
            t.add_column(col, overflow="fold")
        for d in report.diagnostics:
            t.add_row(
                f"[{_SEV_STYLE[d.severity]}]{d.severity.value}[/]",
                d.code,
                d.module_path or d.node or "-",
                d.message,
                d.source or "-",
            )
        console.print(t)
    elif report.command == "analyze":
        console.print("[green]No findings.[/]")
    if report.verification is not None:
        v = report.verification
        style = "green" if v.get("passed") else "bold red"
        console.print(f"Verification: [{style}]{v.get('summary', '')}[/]", highlight=False)
    for key, value in report.extra.items():
        console.print(f"{key}: {value}")


def render_summary(outcomes: list[tuple[str, Any, str | None]], lint: Any, console: Console) -> None:
    """One row per analyzed model: norms, folds, findings by severity, and pass/fail."""
    table = Table(title=f"Summary ({len(outcomes)} models)")
    for col in ("model", "norms", "foldable", "errors", "warnings", "info", "status"):
        table.add_column(col)
    for model, report, error in outcomes:
        if report is None:
            table.add_row(model, "", "", "", "", "", f"[red]could not be analyzed[/]: {error}")
            continue
        count = {
            s: sum(d.severity.value == s for d in report.diagnostics) for s in ("error", "warning", "info")
        }
        foldable = sum(n.verdict.startswith("fold") for n in report.norms)
        status = "[red]fail[/]" if lint.fails(report) else "[green]pass[/]"
        table.add_row(
            model,
            str(len(report.norms)),
            str(foldable),
            str(count["error"]),
            str(count["warning"]),
            str(count["info"]),
            status,
        )
    console.print(table)
