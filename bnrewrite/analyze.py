"""`bnrewrite.analyze`: the norm-layer inventory with fold verdicts, and the lint findings."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import fx

from bnrewrite import precision_report
from bnrewrite.capture.capture_model import Capture, Region, capture
from bnrewrite.diagnostics import Action, NormEntry, Report
from bnrewrite.fold import gc_paused, plan_capture
from bnrewrite.lint import RULES, RuleContext
from bnrewrite.plan.decision import NOT_FOLDABLE, FoldPolicy
from bnrewrite.rewrite_rules.bn_rules import decide
from bnrewrite.rewrite_rules.merge_branches import MERGE_BRANCHES
from bnrewrite.select import Selector
from bnrewrite.semantics.norms import (
    BNSite,
    OtherNormSite,
    find_norms,
    lookalikes,
    opaque_norms,
    other_norm_family,
)
from bnrewrite.semantics.ops import module_at, source_line, target_name
from bnrewrite.semantics.shapes import shape_lookup
from bnrewrite.weight_precision import PrecisionThresholds


def _describe(region: Region, node: fx.Node | None) -> str | None:
    if node is None:
        return None
    if node.op == "call_module":
        m = module_at(region.gm, str(node.target))
        return f"{region.module_path(node)} ({type(m).__name__})"
    return f"{region.qualify(node.name)} ({target_name(node)})"


def _after(region: Region, node: fx.Node) -> list[str]:
    return [d for u in node.users if (d := _describe(region, u)) is not None and u.op != "output"] + (
        ["output"] if any(u.op == "output" for u in node.users) else []
    )


def opaque_norm_entries(cap: Capture) -> list[NormEntry]:
    """Inventory entries for the norm modules that only untraceable code calls."""
    return [
        NormEntry(
            None,
            o.module_path,
            type(o.module).__name__,
            other_norm_family(o.module) or "batch",
            None,
            [],
            NOT_FOLDABLE,
            None,
            "FD203",
            f"called from untraceable code in {o.where}: {o.reason}",
        )
        for o in opaque_norms(cap)
    ]


def inventory(cap: Capture, bns: list[BNSite], others: list[OtherNormSite]) -> list[NormEntry]:
    """One entry per norm layer, read from the graphs as captured; the BatchNorm entries (the
    first ``len(bns)``) get their verdicts from the fold's plan (:func:`_apply_verdicts`)."""
    entries = [_bn_entry(site) for site in bns]
    entries += [_other_entry(o) for o in others]
    entries.extend(opaque_norm_entries(cap))
    for lk in lookalikes(cap):
        why = f"looks like a norm or affine layer, but {lk.reason}"
        entries.append(
            NormEntry(None, lk.module_path, lk.kind, "affine", None, [], NOT_FOLDABLE, None, "FD208", why)
        )
    return entries


def _bn_entry(site: BNSite) -> NormEntry:
    verdict, target, code, reason = "", None, None, ""  # the plan's verdict, filled in later
    family = "affine" if site.is_affine_layer else ("frozen" if site.frozen else "batch")
    before, after = _describe(site.region, site.input), _after(site.region, site.node)
    return NormEntry(
        site.name, site.module_path, site.kind, family, before, after, verdict, target, code, reason,
        source_line(site.call),
    )  # fmt: skip


def _other_entry(o: OtherNormSite) -> NormEntry:
    first = o.node.args[0] if o.node.args and isinstance(o.node.args[0], fx.Node) else None
    why = f"{o.family} norm computes statistics per input: nothing to fold"
    return NormEntry(
        o.name, o.module_path, o.kind, o.family, _describe(o.region, first), _after(o.region, o.node),
        "not-applicable", None, "FD205", why, source_line(o.node),
    )  # fmt: skip


def _without_merged_lookalikes(entries: list[NormEntry], planned: dict[str, Action]) -> list[NormEntry]:
    """Drop the look-alike entry of a module whose BatchNorm a branch merge absorbs (DBB's
    BatchNorm-and-pad layer): the BatchNorm's own entry says what happens to it."""
    merged = [a.module_path for a in planned.values() if a.kind == MERGE_BRANCHES and a.module_path]
    return [
        e
        for e in entries
        if not (
            e.reason_code == "FD208"
            and e.module_path
            and any(p.startswith(e.module_path + ".") for p in merged)
        )
    ]


def _apply_verdicts(
    cap: Capture,
    bns: list[BNSite],
    entries: list[NormEntry],
    planned: dict[str, Action],
    kept: dict[str, Any],
) -> None:
    """The plan's verdict for every BatchNorm: the fold it applies, or why it stays (the fold's
    final decision); a BatchNorm the plan did not reach (a GraphModule input) is decided here."""
    for site, entry in zip(bns, entries):
        step = kept.get(site.name)
        if step is not None:
            entry.verdict, entry.reason_code, entry.reason = step.verdict, step.code, step.reason
        elif site.name not in planned:
            d = decide(site, shape_lookup(cap))
            entry.verdict, entry.target, entry.reason_code, entry.reason = (
                d.verdict,
                d.target,
                d.code,
                d.reason,
            )
    for entry in entries:
        action = planned.get(entry.node or "")
        if action is not None:
            entry.verdict, entry.target, entry.reason_code, entry.reason = (
                action.kind,
                action.target,
                action.code,
                action.detail,
            )


def _norm_affine_verdicts(cap: Capture, report: Report, plan: Report) -> None:
    """The norm-affine rule's verdicts (FD112): an entry for a norm found by what it computes
    (no class of torch's), and the reason beside every norm whose affine stays."""
    known = {e.node for e in report.norms}
    found = {a.module_path for a in plan.actions if a.code == "FD112" and a.node not in known}
    report.norms = [e for e in report.norms if not (e.reason_code == "FD208" and e.module_path in found)]
    for a in plan.actions:
        if a.code == "FD112" and a.node not in known:
            module = cap.model.get_submodule(a.module_path or "")
            kind = type(module).__name__
            report.norms.append(
                NormEntry(a.node, a.module_path, kind, "layer", None, [], a.kind, a.target, a.code, a.detail)
            )
    refused = [d for d in plan.diagnostics if d.code == "FD112"]
    report.diagnostics.extend(refused)
    by_node = {d.node: d for d in refused}
    for entry in report.norms:
        d = by_node.get(entry.node)
        if d is not None and entry.reason_code == "FD205":
            entry.reason += "; affine stays: " + d.message.split(": ", 2)[-1]


def analyze(
    model: Any,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[type | str] = (),
    rules: Iterable[str] | None = None,
    name: str | None = None,
    select: str | Iterable[str] | None = None,
    types: Iterable[str | type] | None = None,
    merge_branches: bool = True,
    precision: PrecisionThresholds | None = None,
    norm_affine: bool = False,
) -> Report:
    """Inventory every normalization layer and lint the model for BatchNorm pitfalls.

    ``model`` may be an ``nn.Module`` (traced whole, or in its traceable parts), a
    ``GraphModule`` or an ``ExportedProgram``. With ``example_inputs`` the capture records one
    eager pass (call counts, shapes) as ``fold`` does, and shapes are propagated only where a
    verdict (Linear -> BatchNorm1d) or a rule (batch size) needs one. The verdicts are the plan
    ``fold`` applies, computed on the same capture: no second capture, no weights, no proof.
    Branch sets (parallel branches summed) are listed in ``extra['branch_sets']`` with their
    verdict and, when they are not merged, the reason; ``merge_branches=False`` plans as
    ``fold --keep-branches`` does. ``extra['precision']`` has the numbers of every layer a
    fold would write, with findings PR001-PR005 (thresholds: ``precision``).
    """
    with gc_paused():  # as fold does: the trace's many objects would trigger full collections
        cap = capture(model, example_inputs, leaf_modules=leaf_modules, record_sources=True)
        report = _analyze(model, cap, leaf_modules, rules, name, select, types, merge_branches, norm_affine)
        steps = [(e.module_path, e.node, e.verdict, e.target) for e in report.norms]
        precision_report.of_plan(cap.model, report, steps, precision)
        return report


def _analyze(
    model: Any,
    cap: Capture,
    leaf_modules: Iterable[type | str],
    rules: Iterable[str] | None,
    name: str | None,
    select: str | Iterable[str] | None,
    types: Iterable[str | type] | None,
    merge_branches: bool,
    norm_affine: bool = False,
) -> Report:
    bns, others = find_norms(cap)
    report = Report("analyze", name or type(model).__name__, dialect=cap.dialect, opaque=list(cap.opaque))
    # Inventory and rules read the graphs as captured; then the fold's own plan runs on the same
    # capture (no second capture, no weights computed, no proof) and gives the verdicts, so they
    # are the ones a fold applies (to a fixed point: a BatchNorm may fold once another one has).
    report.norms = inventory(cap, bns, others)
    ctx = RuleContext(cap, bns, others)
    selected = RULES if rules is None else {c: RULES[c] for c in rules}
    for rule in selected.values():
        report.diagnostics.extend(rule(ctx))
    policy = FoldPolicy(merge_branches=merge_branches, norm_affine=norm_affine)
    plan = plan_capture(model, cap, policy)
    if "branch_sets" in plan.extra:
        report.extra["branch_sets"] = plan.extra["branch_sets"]
    report.diagnostics.extend(d for d in plan.diagnostics if d.code == "FD110")  # merged sets: in the table
    planned = {a.node: a for a in plan.actions if a.node}
    kept = plan.plan.kept() if plan.plan is not None else {}
    _apply_verdicts(cap, bns, report.norms, planned, kept)
    report.norms = _without_merged_lookalikes(report.norms, planned)
    if norm_affine:
        _norm_affine_verdicts(cap, report, plan)
    refused = {d.node: d for d in plan.diagnostics if d.code == "FD207" and d.node}
    for entry in report.norms:  # the eager run contradicts the graph: a fold would not apply it
        if entry.node in refused:
            entry.verdict, entry.target, entry.reason_code = NOT_FOLDABLE, None, "FD207"
            entry.reason = refused[entry.node].message
    if select or types:
        chosen = Selector.of(select, types)
        report.norms = [n for n in report.norms if chosen.matches(n.module_path, n.kind)]
        paths = Selector.of(select)
        report.diagnostics = [d for d in report.diagnostics if paths.matches(d.module_path, "")]
    return report
