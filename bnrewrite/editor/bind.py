"""Bind planned units to the result tree: resolve every deferred edit against the copy-on-write
tree (wherever a module is held), remember what each replaces so the proof can undo it, and give
each unit its local checks (:mod:`~bnrewrite.local_checks`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bnrewrite.editor.edit import Editor, held
from bnrewrite.editor.units import (
    _ATTR,
    _INPLACE,
    _MODULE,
    _PARAM,
    Edit,
    ModuleEdit,
    ParamEdit,
    SetEdit,
    Unit,
)
from bnrewrite.layer_check import LayerCheck
from bnrewrite.local_checks import GraphCheck, LocalCheck, SlotCheck, StillRuns
from bnrewrite.semantics.norms import (
    is_plain_norm_module,
)
from bnrewrite.stash import Stash


def bind(
    units: list[Unit], editor: Editor, stash: Stash | None = None, *, checks: bool = True, dtype: Any = None
) -> None:
    """Resolve deferred edits against the result tree (copy-on-write through ``editor``),
    record what each replaces, so every unit can be applied and undone, and give each unit its
    local checks (:mod:`~bnrewrite.local_checks`) when a proof will run them (``checks``). A
    parameter written in place has its old values in ``stash``. ``dtype`` (a target dtype such as
    float16): the layer checks also judge each fold in it (FD111)."""
    for unit in units:
        bound: list[Edit] = []
        for e in unit.edits:
            if isinstance(e, ModuleEdit):  # wherever the module is held
                for holder in editor.holders(e.name):
                    bound.append(Edit(holder[1], _MODULE, holder[2], held(holder), e.new, holder, e.name))
            elif isinstance(e, SetEdit):
                bound.extend(_set_edits(e, editor))
            elif isinstance(e, ParamEdit):
                owner = editor.own(e.name)
                weight, bias = e.new()
                for pname, value in (("weight", weight), ("bias", bias)):
                    old = owner._parameters.get(pname)
                    if value is not None and value is old and stash is not None and stash.has(old):
                        bound.append(Edit(owner, _INPLACE, pname, stash.saved(old), old, path=e.name))
                        continue
                    if value is None or value is old:
                        continue
                    grad = old.requires_grad if old is not None else owner._parameters["weight"].requires_grad
                    new = (
                        value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=grad)
                    )
                    bound.append(Edit(owner, _PARAM, pname, old, new, path=e.name))
            else:
                bound.append(e)
        unit.edits = bound
        unit.checks = _checks(unit, editor, dtype) if checks else []


def _set_edits(e: SetEdit, editor: Editor) -> list[Edit]:
    """The parameters and attributes a :class:`SetEdit` changes, bound to our copy of its module."""
    owner = editor.own(e.name)
    out = [Edit(owner, _PARAM, k, owner._parameters.get(k), v, path=e.name) for k, v in e.params.items()]
    out += [Edit(owner, _ATTR, k, getattr(owner, k), v, path=e.name) for k, v in e.attrs.items()]
    return out


def _checks(unit: Unit, editor: Editor, dtype: Any = None) -> list[LocalCheck]:
    """The unit's local checks, bound to the result tree's modules."""
    checks: list[LocalCheck] = []
    watched: dict[int, tuple[str, nn.Module]] = {}
    replaced: dict[str, Edit] = {}
    params: dict[str, dict[str, torch.Tensor | None]] = {}
    owners: dict[str, nn.Module] = {}
    for e in unit.edits:
        if e.kind == _MODULE and isinstance(e.old, nn.Module):
            watched.setdefault(id(e.old), (e.path, e.old))
            replaced.setdefault(e.path, e)
        elif e.kind in (_PARAM, _INPLACE):
            params.setdefault(e.path, {})[e.name] = e.old  # a stash.Saved when written in place
            owners[e.path] = e.owner
            original = editor.original_of(e.owner)
            if original is not e.owner:
                watched.setdefault(id(original), (e.path, original))
    if watched:
        checks.append(StillRuns(unit.label, list(watched.values())))
    if unit.graph_path:  # a module replaced by its folded graph: the root's is the global check
        if unit.graph_path in replaced:
            e = replaced[unit.graph_path]
            checks.append(GraphCheck(unit.label, e.new, e.old))
        return checks
    absorbed: dict[str, list[Any]] = {}
    for spec in unit.specs:
        if spec.kind == "layer":
            absorbed.setdefault(spec.path, []).extend(spec.absorbed)
        elif spec.path in replaced:
            e = replaced[spec.path]
            if type(e.new) is nn.Identity and is_plain_norm_module(e.old):
                continue  # torch's own BatchNorm replaced by nothing: the layer check covers it
            affine = spec.affine if spec.mode == "inverse" else None
            checks.append(SlotCheck(spec.path, e.new, e.old, affine, axis=spec.axis))
    for spec in unit.specs:
        if spec.kind == "module" and spec.build is not None and spec.path in owners:
            owner = owners[spec.path]
            checks.append(spec.build(owner, editor.original_of(owner)))
    for path, steps in absorbed.items():
        if path in owners:
            checks.append(LayerCheck(path, owners[path], params[path], steps, dtype=dtype))
    return checks
