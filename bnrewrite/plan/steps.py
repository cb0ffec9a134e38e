"""The plan as data: what a fold (or a surgery) would change, step by step. ``fold(dry_run=True)``,
``analyze``, ``render`` and the report read these objects; ``to_dict`` runs only at the report's
JSON boundary (``extra['plan']``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bnrewrite.plan.decision import Verdict


@dataclass
class EditStep:
    """Module-tree edits that stand or fall together: the folds they carry, the modules that
    change class (path -> what it becomes) and the modules that get new weights."""

    folds: list[str]
    modules: dict[str, str] = field(default_factory=dict)
    weights: list[str] = field(default_factory=list)

    def describe(self) -> str:
        modules = ", ".join(f"{p} -> {m}" for p, m in self.modules.items())
        return f"fold {', '.join(self.folds)}: {modules}; new weights in {', '.join(self.weights) or '-'}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GraphStep:
    """A module replaced by its rewritten graph (``"<root>"``: the whole model), with why; for a
    fold, the folds the graph carries."""

    graph: str
    reasons: list[str] = field(default_factory=list)
    folds: list[str] | None = None

    def describe(self) -> str:
        why = "; ".join(self.reasons)
        if self.folds is None:
            return f"{self.graph} becomes its rewritten graph: {why}"
        return f"{self.graph} becomes its folded graph (folds {', '.join(self.folds)}): {why}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"graph": self.graph, "reasons": self.reasons}
        if self.folds is not None:
            out["folds"] = self.folds
        return out


@dataclass
class SwapStep:
    """A module replaced by another one (surgery: BatchNorm -> GroupNorm, ...)."""

    module: str
    becomes: str

    def describe(self) -> str:
        return f"{self.module} becomes {self.becomes}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class KeepStep:
    """A BatchNorm that stays: the fold's final verdict on it, and why."""

    keeps: str
    module: str | None
    verdict: Verdict
    code: str
    reason: str

    def describe(self) -> str:
        return f"{self.module or self.keeps} stays: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": str(self.verdict)}


Step = EditStep | GraphStep | SwapStep | KeepStep


@dataclass
class Plan:
    """Every step of a plan, in order."""

    steps: list[Step] = field(default_factory=list)

    @property
    def edits(self) -> int:
        """How many steps change something (a BatchNorm that stays changes nothing)."""
        return sum(not isinstance(s, KeepStep) for s in self.steps)

    def kept(self) -> dict[str, KeepStep]:
        """The BatchNorms that stay, by node name."""
        return {s.keeps: s for s in self.steps if isinstance(s, KeepStep)}

    def to_dict(self) -> list[dict[str, Any]]:
        return [s.to_dict() for s in self.steps]
