"""The one driver: every rule over a captured ``nn.Module``, so that the result is the user's own
module tree.

Per region, :func:`run_rules` runs the graph rules in their order - the branch merges (found on
the graph as captured), then the BatchNorm rules to a fixed point (``rewrite_rules.fold_bn``) -
without compiling anything; ``rewrite_rules.bn_tree`` turns each applied fold into module-tree
edits. Folds that no module edit can express make the smallest module enclosing them a graph of
its own: that module is captured alone, run through the same :func:`run_rules`, and swapped in
(FD104 names it and the reason). Then the tree rules plan around those scopes (the opt-in
``norm_affine``). Every change is a :class:`~bnrewrite.editor.units.Unit`, so the proof can undo
any of them; ``dry_run`` stops at the typed plan (``plan.steps``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from bnrewrite.capture.capture_model import capture_submodule, record_inputs
from bnrewrite.capture.tracer import compile_now
from bnrewrite.capture.unguard import drop_export_guards
from bnrewrite.codes import finding
from bnrewrite.diagnostics import Diagnostic, Report
from bnrewrite.editor.bind import bind
from bnrewrite.editor.edit import Editor, shallow_copy
from bnrewrite.editor.units import ModuleEdit, ParamEdit, Unit, common_prefix, covers
from bnrewrite.errors import BnrewriteError
from bnrewrite.plan.decision import Decision, FoldPolicy
from bnrewrite.plan.steps import EditStep, GraphStep, KeepStep, Plan
from bnrewrite.rewrite_rules import norm_affine
from bnrewrite.rewrite_rules.bn_tree import TreePlanner
from bnrewrite.rewrite_rules.branch_sets import MERGE, BranchSet
from bnrewrite.rewrite_rules.fold_bn import Applied, RegionFold, fold_region
from bnrewrite.rewrite_rules.merge_branches import RegionMerge, merge_actions, merge_region
from bnrewrite.semantics.captured import Capture, Region
from bnrewrite.semantics.shapes import ShapeLookup, shape_lookup
from bnrewrite.stash import Stash


class TreeResult:
    """The result tree, the units applied to it, and the model as they make it now."""

    def __init__(
        self, root: nn.Module, units: list[Unit], root_graph: Unit | None, stash: Stash | None = None
    ) -> None:
        self.root = root
        self.units = units
        self.root_graph = root_graph
        self.stash = stash  # old values of tensors written in place, until the proof is done

    def release(self) -> None:
        """The proof is done: the old values of tensors written in place are not needed."""
        if self.stash is not None:
            self.stash.close()
            self.stash = None

    def current(self) -> nn.Module:
        if self.root_graph is not None and self.root_graph.active:
            assert self.root_graph.graph is not None
            return self.root_graph.graph
        return self.root

    def drop(self, undone: list[Unit]) -> None:
        self.units = [u for u in self.units if all(u is not d for d in undone)]

    def commit_inplace(self) -> None:
        """``inplace=True`` after the proof: new values go into the model's existing
        parameters (same objects, same storage) wherever shape and dtype allow, and no other
        module holds the parameter too (tied weights keep their old values for the other one)."""
        held: dict[int, int] = {}
        for m in self.root.modules():
            for t in m._parameters.values():
                held[id(t)] = held.get(id(t), 0) + 1
        for unit in self.units:
            for e in unit.edits:
                old, new = e.old, e.new
                same = (
                    isinstance(old, nn.Parameter)
                    and isinstance(new, torch.Tensor)
                    and (old.shape, old.dtype, old.device) == (new.shape, new.dtype, new.device)
                )
                if e.kind == "param" and same and held.get(id(old), 0) == 0:
                    old.data.copy_(new.data)
                    e.owner._parameters[e.name] = old


def plan_and_apply(
    cap: Capture,
    rank_of: ShapeLookup,
    report: Report,
    policy: FoldPolicy,
    *,
    inplace: bool,
    keep_old: bool,
    release_graphs: bool = False,
    dry_run: bool = False,
) -> TreeResult:
    """Fold every region, express the folds as tree edits, apply them; see the module doc.

    ``release_graphs``: the capture is ours, its graphs are dropped once the plan is made.
    ``dry_run``: stop at the plan (``report.extra['plan']``): no weights computed, nothing
    captured again, nothing applied."""
    # inplace=True writes the folded weights into the model's own tensors even when the proof
    # may undo some: the old values wait on disk (a Stash), not in RAM.
    planned, units, graphs, merges = _plan(cap, rank_of, report, policy, inplace)
    if dry_run:
        return _dry_run(cap, report, planned, units, graphs, merges)
    # inplace=True writes the folded weights into the model's own tensors even when the proof
    # may undo some: the old values wait on disk (a Stash), not in RAM.
    stash = Stash() if (inplace and keep_old) else None
    diagnostics = [d for d in planned.diagnostics if not any(covers(g, d.module_path or "") for g in graphs)]
    root_graph = None
    rec = record_inputs(cap, set(graphs)) if len(graphs) > 1 else None  # one pass for every scope
    for path, reasons in graphs.items():
        unit = _graph_unit(cap, path, reasons, policy, diagnostics, rec)
        if path == "":
            root_graph = unit
        units.append(unit)
    # The graphs have done their work: drop them before the folded weights are allocated.
    planned.needs.clear()
    if release_graphs:
        cap.regions = []
    _fill(planned.pending, units, stash)
    root = cap.model if inplace else shallow_copy(cap.model)
    editor = Editor(root, inplace=inplace)
    bind(units, editor, stash, checks=keep_old, dtype=policy.target_dtype)  # checks: only for a proof
    for u in units:
        u.apply()
    diagnostics.extend(_rest_notes(units))
    report.diagnostics.extend(diagnostics)
    return TreeResult(root, units, root_graph, stash)


def _plan(
    cap: Capture, rank_of: ShapeLookup, report: Report, policy: FoldPolicy, inplace: bool
) -> tuple[_Planned, list[Unit], dict[str, list[str]], list[BranchSet]]:
    """Every rule's plan: the graph rules per region, the module scopes that must become graphs,
    and the tree rules (norm affines, opt-in) around them."""
    planned = _plan_regions(cap, rank_of, inplace, policy)
    if policy.merge_branches:
        report.extra["branch_sets"] = [s.to_dict() for s in planned.sets]
    merges = [s for s in planned.sets if s.verdict == MERGE]
    why = "its forward sums {} branches that merge into one layer (FD109)"
    graphs = _graph_scopes(
        planned.needs, planned.units, [(s.owner, why.format(len(s.terms))) for s in merges]
    )
    units = [u for u in planned.units if not any(all(covers(g, p) for p in u.paths) for g in graphs)]
    if policy.norm_affine:  # opt-in rule: plans tree edits beside the BatchNorm folds
        taken = {p for u in units for p in u.paths}
        found = norm_affine.plan(cap, taken=taken, scopes=graphs, selector=policy.selector)
        units.extend(found.units)
        planned.diagnostics.extend(found.refusals)
    return planned, units, graphs, merges


def _dry_run(
    cap: Capture,
    report: Report,
    planned: _Planned,
    units: list[Unit],
    graphs: dict[str, list[str]],
    merges: list[BranchSet],
) -> TreeResult:
    """The plan as data (``report.extra['plan']``), with the merges' actions; nothing applied."""
    result = _plan_only(cap, report, units, planned.needs, graphs, planned.diagnostics)
    report.plan.steps.extend(kept_step(d) for d in planned.kept)
    merged = [a for s in merges for a in _merge_actions(s)]
    absorbed = {a.node for a in merged}  # a BatchNorm a merge absorbs is not folded on its own
    report.actions[:] = [a for a in report.actions if a.node not in absorbed] + merged
    for step in report.plan.steps:  # a block that becomes its merged graph absorbs these
        if isinstance(step, GraphStep) and step.folds is not None:
            scope = "" if step.graph == "<root>" else step.graph
            step.folds += [a.module_path for a in merged if a.module_path and covers(scope, a.module_path)]
    return result


def _fill(pending: list[tuple[Any, Any]], units: list[Unit], stash: Stash | None) -> None:
    """Compute the folded weights the units use (in place: the old values go to ``stash``
    first); a fold that a graph carries instead gets none."""
    live = {id(getattr(e.new, "__self__", None)) for u in units for e in u.edits if isinstance(e, ParamEdit)}
    for slot, compute in pending:
        if id(slot) not in live:
            continue
        if stash is not None:
            slot.stash_into(stash)
        slot.fill(compute)
    pending.clear()


def _rest_notes(units: list[Unit]) -> list[Diagnostic]:
    """FD104 for every norm module whose rest of forward becomes a graph."""
    return [
        finding(
            "FD104",
            f"{path}: replaced by the folded graph of its forward ({why})",
            None,
            path,
        )
        for u in units
        for path, why in u.graph_rests
    ]


def _plan_only(
    cap: Capture,
    report: Report,
    units: list[Unit],
    needs: list[tuple[str, str, Applied, Region]],
    graphs: dict[str, list[str]],
    diagnostics: list[Diagnostic],
) -> TreeResult:
    """The plan as plain data (module paths, no graph), with the report a fold would give."""
    plan = Plan()
    for u in units:
        modules = {e.name: describe_module(e.new) for e in u.edits if isinstance(e, ModuleEdit)}
        weights = sorted({e.name for e in u.edits if not isinstance(e, ModuleEdit)})
        plan.steps.append(EditStep([a.module_path or a.node or "?" for a in u.actions], modules, weights))
    for path, reasons in graphs.items():
        inside = [a.action.module_path or a.action.node or "?" for p, _w, a, _r in needs if covers(path, p)]
        plan.steps.append(GraphStep(path or "<root>", reasons, inside))
        diagnostics.append(
            finding(
                "FD104",
                f"{path or '<root>'}: would be replaced by its folded graph ({'; '.join(reasons)})",
                None,
                path or None,
            )
        )
    diagnostics.extend(_rest_notes(units))
    report.diagnostics.extend(diagnostics)
    report.actions.extend(a for u in units for a in u.actions)
    report.actions.extend(a.action for _p, _w, a, _r in needs)
    report.plan = plan
    return TreeResult(cap.model, [], None)


def describe_module(module: nn.Module) -> str:
    if isinstance(module, nn.Sequential):
        return f"Sequential({', '.join(type(m).__name__ for m in module)})"
    if isinstance(module, fx.GraphModule):
        return "graph of the rest of its forward"
    return type(module).__name__


def kept_step(d: Decision) -> KeepStep:
    """A plan step for a BatchNorm that stays: the fold's final verdict on it, and why."""
    return KeepStep(d.site.name, d.site.module_path, d.verdict, d.code, d.reason)


def _merge_actions(bset: BranchSet) -> list[Any]:
    where = f"{bset.owner}.reparam" if bset.owner else "reparam"
    return merge_actions(bset, where)


@dataclass
class RegionRun:
    """What the graph rules did to one region: the branch merges (if asked for), then the
    BatchNorm folds to a fixed point."""

    merged: RegionMerge | None
    folded: RegionFold

    @property
    def actions(self) -> list[Any]:
        return (self.merged.actions if self.merged is not None else []) + self.folded.actions

    @property
    def diagnostics(self) -> list[Diagnostic]:
        return (self.merged.diagnostics if self.merged is not None else []) + self.folded.diagnostics


def run_rules(
    region: Region, shapes: ShapeLookup, policy: FoldPolicy, *, apply: bool, inplace: bool = False
) -> RegionRun:
    """The graph rules over one region, in their order: branch sets are found on the graph as
    captured and merged (``apply``) or planned; then every BatchNorm is folded to a fixed point.
    ``apply=False`` plans tree edits: nothing compiled, no weights computed yet."""
    merged = (
        merge_region(region, policy, apply=apply, shape_of=shapes.shape) if policy.merge_branches else None
    )
    folded = fold_region(region, shapes, policy, inplace=inplace, compile=apply)
    return RegionRun(merged, folded)


@dataclass
class _Planned:
    """What planning every region gave: tree units, folds only a graph can carry, findings,
    weights to compute, branch sets with verdicts, and the decision for each BatchNorm kept."""

    units: list[Unit] = field(default_factory=list)
    needs: list[tuple[str, str, Applied, Region]] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    pending: list[tuple[Any, Any]] = field(default_factory=list)
    sets: list[BranchSet] = field(default_factory=list)
    kept: list[Decision] = field(default_factory=list)


def _plan_regions(cap: Capture, rank_of: ShapeLookup, inplace: bool, policy: FoldPolicy) -> _Planned:
    """Fold every region as a graph (nothing compiled, no weights computed yet) and plan the
    tree edits. The branch sets are found first, on the graph as captured."""
    calls = cap.graph_calls()
    out = _Planned()
    for region in cap.regions:
        ran = run_rules(region, rank_of, policy, apply=False, inplace=inplace)
        rf = ran.folded
        if ran.merged is not None:
            out.sets.extend(ran.merged.sets)
        out.diagnostics.extend(ran.diagnostics)  # FD109s inside graph scopes give way to the applied ones
        out.pending.extend(rf.pending)
        out.kept.extend(rf.kept)
        planner = TreePlanner(cap, region, calls)
        region_units, region_needs = planner.plan(rf.applied)
        out.units.extend(region_units)
        for a, why in planner.contradicted:
            out.diagnostics.append(
                finding(
                    "FD207",
                    f"{a.action.module_path or a.action.node}: fold not applied: {why}",
                    a.action.node,
                    a.action.module_path,
                )
            )
        out.needs.extend((path, why, a, region) for path, why, a in region_needs)
    return out


def _graph_scopes(
    needs: list[tuple[str, str, Applied, Region]], units: list[Unit], merges: list[tuple[str, str]]
) -> dict[str, list[str]]:
    """Module paths to replace by graphs (none inside another), each with its reasons; a scope
    grows until no tree unit straddles its boundary."""
    scopes: dict[str, list[str]] = {}
    for path, why, a, _region in needs:
        scopes.setdefault(path, []).append(f"{a.action.module_path or a.action.node}: {why}")
    for path, why in merges:
        scopes.setdefault(path, []).append(why)
    changed = True
    while changed:
        changed = False
        for outer in list(scopes):
            for inner in list(scopes):
                if inner != outer and inner in scopes and outer in scopes and covers(outer, inner):
                    scopes[outer].extend(scopes.pop(inner))
                    changed = True
        for u in units:
            for g in list(scopes):
                inside = [covers(g, p) for p in u.paths]
                if any(inside) and not all(inside):
                    wider = common_prefix([g, *u.paths])
                    scopes.setdefault(wider, []).extend(scopes.pop(g))
                    changed = True
    return scopes


def _graph_unit(
    cap: Capture,
    path: str,
    reasons: list[str],
    policy: FoldPolicy,
    diagnostics: list[Diagnostic],
    rec: Any = None,
) -> Unit:
    """Capture the module at ``path`` alone, fold it as a graph, and make swapping it in a unit."""
    region = capture_submodule(cap, path, rec)
    if region is None:
        raise BnrewriteError(f"{path or '<root>'}: cannot be captured alone to carry a graph-only fold")
    sub = Capture(region.gm, [region], example_inputs=region.inputs)
    shapes = shape_lookup(sub)
    ran = run_rules(region, shapes, policy, apply=True)
    region.gm.delete_all_unused_submodules()  # no absorbed BatchNorm stays behind
    drop_export_guards(region.gm)  # an exported block accepts any shape again where it can
    compile_now(region.gm)
    region.gm.training = (cap.model.get_submodule(path) if path else cap.model).training
    why = "; ".join(reasons)
    diagnostics.extend(ran.diagnostics)
    diagnostics.append(
        finding(
            "FD104",
            f"{path or '<root>'}: replaced by its folded graph (a module edit cannot express: {why})",
            None,
            path or None,
        )
    )
    actions = ran.actions
    unit = Unit(actions=actions, graph_path=path, reason=why, graph=region.gm)
    if path:
        unit.edits.append(ModuleEdit(path, region.gm))
    return unit
