"""Findings as SARIF 2.1.0, the format CI systems use to annotate code review.

One run per analyzed model (``automationDetails.id`` names it); every code that can be reported
is a rule with its summary and ``bnrewrite explain`` text; every finding is a result with its
level, message, the user's source line when the graph recorded one (as a path relative to the
working directory when it lies inside it) and the dotted module path as a logical location.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bnrewrite import codes
from bnrewrite.diagnostics import Diagnostic, Report, Severity

SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
LEVELS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}


def _rules() -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "name": c.name,
            "shortDescription": {"text": c.summary},
            "fullDescription": {"text": c.explanation},
            "defaultConfiguration": {"level": LEVELS[c.severity]},
        }
        for c in codes.all_codes()
    ]


def _location(d: Diagnostic) -> dict[str, Any] | None:
    location: dict[str, Any] = {}
    if d.source:
        path, _, line = d.source.rpartition(":")
        uri = Path(path).resolve()
        cwd = Path(os.getcwd()).resolve()
        if uri.is_relative_to(cwd):
            uri = uri.relative_to(cwd)
        physical: dict[str, Any] = {"artifactLocation": {"uri": uri.as_posix()}}
        if line.isdigit():
            physical["region"] = {"startLine": int(line)}
        location["physicalLocation"] = physical
    if d.module_path:
        location["logicalLocations"] = [{"fullyQualifiedName": d.module_path, "kind": "module"}]
    return location or None


def _result(d: Diagnostic, index: dict[str, int]) -> dict[str, Any]:
    result: dict[str, Any] = {
        "ruleId": d.code,
        "ruleIndex": index[d.code],
        "level": LEVELS[d.severity],
        "message": {"text": d.message},
    }
    location = _location(d)
    if location:
        result["locations"] = [location]
    if d.node:
        result["properties"] = {"node": d.node}
    return result


def to_sarif(reports: list[Report], version: str) -> dict[str, Any]:
    """A SARIF log with one run per report."""
    rules = _rules()
    index = {r["id"]: i for i, r in enumerate(rules)}
    runs = []
    for report in reports:
        runs.append(
            {
                "tool": {"driver": {"name": "bnrewrite", "version": version, "rules": rules}},
                "automationDetails": {"id": f"bnrewrite/{report.command}/{report.model}"},
                "results": [_result(d, index) for d in report.diagnostics],
            }
        )
    return {"$schema": SCHEMA, "version": "2.1.0", "runs": runs}
