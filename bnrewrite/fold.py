"""`bnrewrite.fold`: capture, fold every region, reassemble the model, report."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import fx, nn

from bnrewrite import precision_report, weight_precision
from bnrewrite.capture.capture_model import capture
from bnrewrite.capture.tracer import compile_now
from bnrewrite.codes import finding
from bnrewrite.diagnostics import Diagnostic, Report
from bnrewrite.driver import TreeResult, kept_step, plan_and_apply, run_rules
from bnrewrite.editor.edit import Editor, shallow_copy
from bnrewrite.errors import UsageError
from bnrewrite.plan.decision import FoldPolicy
from bnrewrite.plan.steps import GraphStep, Plan
from bnrewrite.proof import prove as prove_units
from bnrewrite.select import Selector
from bnrewrite.semantics.captured import Capture
from bnrewrite.semantics.norms import lookalikes, opaque_norms, other_norm_family
from bnrewrite.semantics.shapes import ShapeLookup, shape_lookup
from bnrewrite.weight_precision import PrecisionThresholds


class RewriteResult(NamedTuple):
    """A rewritten model and the report of what was changed; unpacks as ``model, report``."""

    model: nn.Module
    report: Report


def assemble(cap: Capture, *, inplace: bool = False) -> nn.Module:
    """The rewritten model: the single graph, or the original tree with its regions replaced."""
    for region in cap.regions:
        region.gm.delete_all_unused_submodules()  # no absorbed BatchNorm stays behind
        compile_now(region.gm)
    if cap.whole or not cap.regions:
        return cap.regions[0].gm if cap.regions else cap.model
    root = cap.model if inplace else shallow_copy(cap.model)
    editor = Editor(root, inplace=inplace)
    for region in cap.regions:
        editor.set_module(region.path, region.gm)
    return root


def opaque_diagnostics(cap: Capture) -> list[Diagnostic]:
    """FD203 for every BatchNorm-like module that only untraceable code calls, FD208 for every
    module that looks like a norm or an affine layer but computes no per-channel affine map."""
    return [
        finding(
            "FD208",
            f"{lk.module_path}: not folded: looks like a norm or affine layer ({lk.kind}), but {lk.reason}",
            None,
            lk.module_path,
        )
        for lk in lookalikes(cap)
    ] + [
        finding(
            "FD203",
            f"{o.module_path}: not folded: called from untraceable code in {o.where}: {o.reason}",
            None,
            o.module_path,
        )
        for o in opaque_norms(cap)
        if other_norm_family(o.module) is None
    ]


def fold(
    model: Any,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    eval_mode: bool = False,
    leaf_modules: Iterable[type | str] = (),
    record_sources: bool = False,
    check_trace: bool = False,
    prove: bool = True,
    select: str | Iterable[str] | None = None,
    types: Iterable[str | type] | None = None,
    bn_to_affine: bool = False,
    speed_check: bool = True,
    dry_run: bool = False,
    merge_branches: bool = True,
    precision: PrecisionThresholds | None = None,
    target_dtype: torch.dtype | None = None,
    norm_affine: bool = False,
) -> RewriteResult:
    """Fold every foldable BatchNorm of ``model`` into neighbouring weights; returns the model and a
    report of every fold and every skip with its reason.

    An ``nn.Module`` comes back as (a copy of) the user's own tree: folded layers carry new weights,
    absorbed BatchNorms are ``nn.Identity``; where no module edit can express a fold, the smallest
    enclosing module becomes its folded graph (FD104). A ``GraphModule``/``ExportedProgram`` is
    folded as a graph, not proven. The input is untouched unless ``inplace=True`` (old values of
    tensors the proof may undo wait on disk: ``bnrewrite.stash``).

    - ``prove`` (with example inputs): every fold checked locally against what it replaced, undone
      by name where it differs (FD207); outputs compared with the eager pass (``bnrewrite.proof``).
    - ``check_trace``: compare each traced graph with eager execution first (one more pass).
    - ``eval_mode``: fold training-mode BatchNorms as if in eval mode.
    - ``select`` (path globs), ``types`` (``BatchNorm2d``, ``F.batch_norm``...): what to fold.
    - ``bn_to_affine``: a BatchNorm no neighbour absorbs becomes a scale-and-shift (else it stays).
    - ``speed_check``: keep a BatchNorm whose fold gives a transposed conv a bias that slows it
      on this machine (FD108).
    - ``merge_branches``: merge parallel branches that are linear once folded (RepVGG, ACNet,
      DBB, MobileOne, RepConv) into one conv where that costs no more (FD109, FD110).
    - ``dry_run``: only the plan (``extra['plan']``): nothing computed, changed or proven.
    - ``precision``: thresholds of PR001-PR005 (``extra['precision']``, ``weight_precision``).
    - ``target_dtype`` (float16/bfloat16): no fold that overflows it or doubles its error
      (FD111); the proof reports both models' errors in it.
    - ``norm_affine``: also fold every LayerNorm/RMSNorm/GroupNorm/InstanceNorm affine into the
      Linear/conv layers that read it, or say why not (FD112, ``rewrite_rules.norm_affine``).
    """
    selector = Selector.of(select, types) if (select or types) else None
    if target_dtype is not None and target_dtype not in (torch.float16, torch.bfloat16):
        raise UsageError(f"target_dtype must be torch.float16 or torch.bfloat16, got {target_dtype}")
    policy = FoldPolicy(
        eval_mode, bn_to_affine, speed_check, selector, merge_branches, target_dtype, norm_affine
    )
    if target_dtype is not None:
        precision = dataclasses.replace(precision or PrecisionThresholds(), target_dtype=target_dtype)
    run = FoldRun(inplace, tuple(leaf_modules), record_sources, check_trace, prove, dry_run, precision)
    with gc_paused():
        return _fold(model, example_inputs, policy, run, None)


@dataclass(frozen=True)
class FoldRun:
    """How one fold runs (as opposed to what it folds, the :class:`FoldPolicy`)."""

    inplace: bool
    leaf_modules: tuple[type | str, ...]
    record_sources: bool
    check_trace: bool
    prove: bool
    dry_run: bool
    precision: PrecisionThresholds | None = None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while folding: tracing allocates many long-lived objects,
    and the collector's full passes over them would make the cost per layer grow with depth."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def plan_capture(model: Any, cap: Capture, policy: FoldPolicy) -> Report:
    """The plan a fold would apply, made on a capture someone already has (``analyze``'s): the
    same verdicts, nothing computed, changed or proven; precision is left to the caller."""
    run = FoldRun(False, cap.leaf_modules, False, False, False, True, None)
    return _fold(model, cap.example_inputs, policy, run, cap).report


def _fold(
    model: Any, example_inputs: Any, policy: FoldPolicy, run: FoldRun, cap: Capture | None
) -> RewriteResult:
    own_capture = cap is None
    if cap is None:
        cap = capture(
            model,
            example_inputs,
            leaf_modules=run.leaf_modules,
            record_sources=run.record_sources,
            check_trace=run.check_trace,
        )
    report = Report("fold", type(model).__name__, dialect=cap.dialect, opaque=list(cap.opaque))
    report.extra["capture"] = cap.how
    rank_of = shape_lookup(cap)
    if isinstance(cap.model, (torch.export.ExportedProgram, fx.GraphModule)):
        return _fold_graph(model, cap, rank_of, policy, run, report)
    proving = run.prove and not run.dry_run and cap.recording is not None and cap.example_inputs is not None
    opaque = opaque_diagnostics(cap)
    inplace = run.inplace and not run.dry_run
    result = plan_and_apply(
        cap,
        rank_of,
        report,
        policy,
        inplace=inplace,
        keep_old=proving,
        release_graphs=own_capture,
        dry_run=run.dry_run,
    )
    if run.dry_run:
        merged = {d.module_path for d in report.diagnostics if d.code == "FD109" and d.module_path}
        report.diagnostics.extend(d for d in opaque if not _inside(d.module_path, merged))
        if own_capture:  # (analyze plans on its capture and reports precision itself)
            steps = [(a.module_path, a.node, a.kind, a.target) for a in report.actions]
            steps += [(d.module_path, d.node, "keeps", None) for d in report.diagnostics if d.code == "FD111"]
            precision_report.of_plan(cap.model, report, steps, run.precision)
        return RewriteResult(model, report)
    if proving:
        try:
            _prove(cap, result, report, run.precision)
        finally:
            result.release()
        if inplace:
            result.commit_inplace()
    elif run.prove:
        report.extra["proof"] = {"passed": None, "note": "no example inputs: the result was not run"}
    report.actions.extend(a for u in result.units for a in u.actions)
    merged = {d.module_path for d in report.diagnostics if d.code == "FD109" and d.module_path}
    affine = {a.module_path for a in report.actions if a.code == "FD112"}  # norms found by what they compute
    report.diagnostics.extend(
        d
        for d in opaque
        if not _inside(d.module_path, merged) and not (d.code == "FD208" and d.module_path in affine)
    )
    folded = result.current()
    precision_report.of_fold(cap.model, folded, report, run.precision)
    return RewriteResult(folded, report)


def _inside(path: str | None, scopes: set[str]) -> bool:
    """True when ``path`` lies inside one of ``scopes`` (module paths)."""
    return bool(path) and any((path + ".").startswith(s + ".") for s in scopes)


def _fold_graph(
    model: Any, cap: Capture, rank_of: ShapeLookup, policy: FoldPolicy, run: FoldRun, report: Report
) -> RewriteResult:
    """A GraphModule or ExportedProgram: folded as the graph it is, and returned as one."""
    kept: list[Any] = []
    scales = _batchnorm_scales(cap) if not run.dry_run else {}  # (the graph loses them as it folds)
    absorbed: set[str | None] = set()  # BatchNorms a (planned) merge absorbs
    for region in cap.regions:
        ran = run_rules(
            region, rank_of, policy, apply=not run.dry_run, inplace=run.inplace and not run.dry_run
        )
        if ran.merged is not None:
            report.extra.setdefault("branch_sets", []).extend(s.to_dict() for s in ran.merged.sets)
            report.actions.extend(ran.merged.actions)
            absorbed.update(a.node for a in ran.merged.actions)
        report.actions.extend(a for a in ran.folded.actions if a.node not in absorbed)
        report.diagnostics.extend(ran.diagnostics)
        kept.extend(ran.folded.kept)
    report.diagnostics.extend(opaque_diagnostics(cap))
    if policy.norm_affine:
        report.diagnostics.append(
            finding(
                "FD112",
                "<root>: norm affines not folded: the input is a graph (GraphModule/ExportedProgram); "
                "the rule edits a module tree: fold the nn.Module it came from",
                None,
                None,
            )
        )
    if run.dry_run:
        folds = [a.module_path or a.node or "?" for a in report.actions]
        report.plan = Plan([GraphStep("<root>", [], folds), *(kept_step(d) for d in kept)])
        return RewriteResult(model, report)
    folded = assemble(cap, inplace=run.inplace)
    precision_report.of_fold(cap.model, folded, report, run.precision, scales=scales)
    return RewriteResult(folded, report)


def _batchnorm_scales(cap: Capture) -> dict[str, torch.Tensor]:
    """Each BatchNorm's ``gamma / sqrt(var + eps)`` by module path, read from the graphs."""
    from bnrewrite.semantics.norms import find_norms

    out = {}
    for site in find_norms(cap)[0]:
        if site.module_path and site.running_var is not None and site.constant:
            out.setdefault(site.module_path, site.eval_affine()[0])
    return out


def _errors_in(
    original: nn.Module, folded: nn.Module, inputs: tuple[Any, ...], dtype: torch.dtype
) -> dict[str, Any]:
    """Both models run in ``dtype`` against float64: the two errors side by side."""
    from bnrewrite.verify import verify

    try:
        result = verify(original, folded, inputs, random_sets=0, dtype=dtype)
    except Exception as exc:  # a model that cannot run in the dtype at all: say so
        return {"dtype": str(dtype).replace("torch.", ""), "error": str(exc)[:200]}
    worst = result.worst()
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "passed": result.passed,
        "original_error": worst.original_abs_error if worst else 0.0,
        "folded_error": worst.max_abs_error if worst else 0.0,
    }


def _prove(
    cap: Capture, result: TreeResult, report: Report, thresholds: PrecisionThresholds | None = None
) -> None:
    """Run the proof, drop what it undid, and say so (FD207; with the reason when the
    BatchNorm is ill-conditioned, PR004)."""
    assert cap.recording is not None and cap.example_inputs is not None
    outcome = prove_units(result.current, cap.example_inputs, cap.recording.outputs, result.units)
    result.drop([u for u, _ in outcome.undone])
    report.extra["proof"] = outcome.to_dict(eager_passes=cap.eager_passes)
    unproven = [u.label for u in result.units if not u.proven]
    if unproven:  # the example inputs never reached these modules
        report.extra["proof"]["not_run"] = unproven
    dtype = thresholds.target_dtype if thresholds is not None else None
    if dtype is not None:
        report.extra["proof"]["target_dtype"] = _errors_in(
            cap.model, result.current(), cap.example_inputs, dtype
        )
    for unit, why in outcome.undone:
        for a in unit.actions:
            scale = weight_precision.batchnorm_scale(
                precision_report.module_at_path(cap.model, a.module_path)
            )
            ill = weight_precision.ill_conditioned(scale, thresholds) if scale is not None else None
            verb = "fold undone" if why.code == "FD207" else "kept for the target dtype"
            report.diagnostics.append(
                finding(
                    why.code,
                    f"{a.module_path or a.node}: {verb}: {why.problem}" + (f"; {ill}" if ill else ""),
                    a.node,
                    a.module_path,
                )
            )
