"""Edits that land in the user's module tree, as data: an :class:`Edit` changes one parameter,
attribute or module and can be undone; a :class:`Unit` groups the edits that stand or fall
together, with the report entries they justify and the local checks (:class:`CheckSpec`) that
prove them. Rules produce deferred edits (by module path: :class:`ModuleEdit`,
:class:`ParamEdit`, :class:`SetEdit`); :func:`~bnrewrite.editor.bind.bind` resolves them
against the copy-on-write result tree."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import fx, nn

from bnrewrite.diagnostics import Action
from bnrewrite.editor.edit import Holder, put
from bnrewrite.semantics.affine import Absorbed, Affine


class EditKind(str, Enum):
    """What an edit changes: a parameter, a module wherever it is held, a plain attribute, or a
    tensor written in place (its old values wait in a stash)."""

    PARAM = "param"
    MODULE = "module"
    INPLACE = "inplace"
    ATTR = "attr"


_PARAM, _MODULE, _INPLACE, _ATTR = EditKind.PARAM, EditKind.MODULE, EditKind.INPLACE, EditKind.ATTR


@dataclass
class Edit:
    """One change to the result tree: a parameter of a module (``owner._parameters[name]``), or
    a module wherever it is held (``holder``: a registered child, a plain list item, ...)."""

    owner: nn.Module
    kind: str
    name: str
    old: Any
    new: Any
    holder: Holder | None = None
    path: str = ""  # the module's path in the tree

    def apply(self) -> None:
        if self.kind == _PARAM:
            self.owner._parameters[self.name] = self.new
        elif self.kind == _MODULE:
            put(self.holder, self.new)
        elif self.kind == _ATTR:
            setattr(self.owner, self.name, self.new)
        # _INPLACE: the new values were written into the tensor itself; ``old`` is on disk

    def undo(self) -> None:
        if self.kind == _PARAM:
            self.owner._parameters[self.name] = self.old
        elif self.kind == _MODULE:
            put(self.holder, self.old)
        elif self.kind == _ATTR:
            setattr(self.owner, self.name, self.old)
        else:
            self.old.restore()  # a stash.Saved


@dataclass
class CheckSpec:
    """A local check the proof runs on this unit: ``kind`` "layer" (the folded layer at
    ``path`` against the original layer and what it ``absorbed``), "slot" (the module now at
    the BatchNorm's ``path`` against the original BatchNorm module: "inverse" when its input
    changed by the BatchNorm's ``affine``, "direct" when it did not) or "module" (a rule's own
    check: ``build(new, original)`` of the module whose parameters changed at ``path``)."""

    kind: str
    path: str
    absorbed: list[Absorbed] = field(default_factory=list)
    affine: Affine | None = None
    mode: str = "inverse"
    axis: int = 1  # the BatchNorm's channel axis
    build: Callable[[nn.Module, nn.Module], Any] | None = None  # kind "module"


@dataclass
class Unit:
    """Edits that stand or fall together (every fold into one layer), with what they report."""

    edits: list[Edit] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    paths: set[str] = field(default_factory=set)  # tree paths of the modules involved
    graph_path: str | None = None  # set when the unit replaces a module by its folded graph
    reason: str | None = None  # why a graph was needed
    graph: fx.GraphModule | None = None
    active: bool = False
    proven: bool = True  # False when the example inputs never ran one of its modules
    specs: list[CheckSpec] = field(default_factory=list)  # what the proof checks locally
    graph_rests: list[tuple[str, str]] = field(default_factory=list)  # (path, why) carried by a graph
    checks: list[Any] = field(default_factory=list)  # the bound local checks (see local_checks)

    @property
    def label(self) -> str:
        if self.graph_path is not None:
            return f"{self.graph_path or '<root>'} (graph)"
        return ", ".join(sorted(a.module_path or a.node or "?" for a in self.actions))

    def apply(self) -> None:
        for e in self.edits:
            e.apply()
        self.active = True

    def undo(self) -> None:
        for e in reversed(self.edits):
            e.undo()
        self.active = False


class ModuleEdit(Edit):
    """Deferred: resolved against the result tree by :func:`bind`."""

    def __init__(self, path: str, new: nn.Module) -> None:
        super().__init__(None, _MODULE, path, None, new)  # type: ignore[arg-type]


class ParamEdit(Edit):
    """Deferred: the layer at ``path`` gets the (weight, bias) that ``tensors()`` computes."""

    def __init__(self, path: str, tensors: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        super().__init__(None, _PARAM, path, None, tensors)  # type: ignore[arg-type]


class SetEdit(Edit):
    """Deferred: set parameters (a tensor, or None to drop one) and plain attributes of the
    module at ``path``, resolved against the result tree by :func:`bind`."""

    def __init__(self, path: str, params: dict[str, Any], attrs: dict[str, Any] | None = None) -> None:
        super().__init__(None, _PARAM, path, None, None)  # type: ignore[arg-type]
        self.params = params
        self.attrs = attrs or {}


def merge_units(units: list[Unit]) -> list[Unit]:
    """Units touching a common module become one (a conv that absorbed two BatchNorms)."""
    owner: dict[str, Unit] = {}  # module path -> the merged unit that touches it
    merged: list[Unit] = []
    for unit in units:
        overlapping = list({id(owner[p]): owner[p] for p in unit.paths if p in owner}.values())
        for m in overlapping:
            merged = [u for u in merged if u is not m]
            unit = Unit(
                m.edits + unit.edits,
                m.actions + unit.actions,
                m.paths | unit.paths,
                proven=m.proven and unit.proven,
            )
        merged.append(unit)
        for p in unit.paths:
            owner[p] = unit
    return merged


def common_prefix(paths: list[str]) -> str:
    """The deepest dotted module path that contains every path given."""
    if not paths:
        return ""
    parts = [p.split(".") if p else [] for p in paths]
    out: list[str] = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)


def covers(outer: str, path: str) -> bool:
    return outer == "" or path == outer or path.startswith(outer + ".")
