"""Diagnostics: stable codes, findings tied to a node and a module path, and the report.

A diagnostic always names *where* (fx node, dotted module path, the user's source line when the
graph recorded it) and *what* (a stable code whose explanation `bnrewrite explain CODE` prints).
The JSON form of a :class:`Report` is a documented, versioned schema (see README).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


class Severity(str, enum.Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "error": 2}[self.value]


@dataclass(frozen=True)
class Code:
    """One stable diagnostic code and its user documentation."""

    id: str
    name: str
    severity: Severity
    summary: str
    explanation: str


@dataclass(frozen=True)
class Diagnostic:
    code: str
    severity: Severity
    message: str
    node: str | None = None
    module_path: str | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["severity"] = self.severity.value
        return d


@dataclass
class NormEntry:
    """One normalization layer found in the model, with the fold verdict."""

    node: str | None
    module_path: str | None
    kind: str
    family: str
    before: str | None
    after: list[str]
    verdict: str
    target: str | None
    reason_code: str | None
    reason: str
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Action:
    """One change a rewrite made (or refused to make), for the rewrite report."""

    kind: str
    node: str | None
    module_path: str | None
    detail: str
    target: str | None = None
    exact: bool = True
    code: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class OpaquePart:
    """A part of the model that could not be captured as a graph, with the tracer's reason."""

    module_path: str
    module_type: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    """What an analysis or a rewrite found and did."""

    command: str
    model: str
    dialect: str = "module"
    norms: list[NormEntry] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    opaque: list[OpaquePart] = field(default_factory=list)
    verification: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # In-memory detail behind ``extra`` that JSON does not carry (per-channel weight ranges for
    # ``--plot``): never serialized.
    details: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # The plan of a dry run (``bnrewrite.plan.steps.Plan``): typed here, ``extra['plan']`` in JSON.
    plan: Any = None

    def add(self, diagnostic: Diagnostic) -> None:
        self.diagnostics.append(diagnostic)

    def worst(self) -> Severity | None:
        if not self.diagnostics:
            return None
        return max((d.severity for d in self.diagnostics), key=lambda s: s.rank)

    def has_at_least(self, severity: Severity) -> bool:
        return any(d.severity.rank >= severity.rank for d in self.diagnostics)

    def codes(self) -> list[str]:
        return [d.code for d in self.diagnostics]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "command": self.command,
            "model": self.model,
            "dialect": self.dialect,
            "norms": [n.to_dict() for n in self.norms],
            "diagnostics": [d.to_dict() for d in self.diagnostics],
            "actions": [a.to_dict() for a in self.actions],
            "opaque": [o.to_dict() for o in self.opaque],
            "verification": self.verification,
            "extra": {**self.extra, "plan": self.plan.to_dict()} if self.plan is not None else self.extra,
        }
