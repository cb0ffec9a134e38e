"""Proof and rollback: a fold never returns a model that fails on the inputs it was given.

After folding, the result runs once on the example inputs. During that run every applied unit
is checked locally against the modules it replaced (:mod:`~bnrewrite.local_checks`), and every
output leaf is compared with the original's outputs recorded in the capture's eager pass (eval
mode, same dtype) within the dtype tolerances ``verify`` uses. A unit whose local check fails
is undone and reported (FD207) by name; a drift no local check explains is judged against a
float64 evaluation of the original before anything is undone. No bisection: the cost does not
grow with the number of folds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bnrewrite.editor.units import Unit
from bnrewrite.local_checks import LocalCheck
from bnrewrite.runtime import buffers_restored, eval_modes, own_copies
from bnrewrite.verify import DEFAULT_TOLERANCES, output_leaves


@dataclass
class Comparison:
    passed: bool
    worst_path: str | None = None
    max_abs_error: float = 0.0
    tolerance: float = 0.0
    problem: str | None = None
    code: str = "FD207"  # the code an undone unit is reported with (FD111: the target dtype)


@dataclass
class Proof:
    """What the proof found: the final comparison, the units undone, the forward passes run."""

    final: Comparison
    undone: list[tuple[Unit, Comparison]] = field(default_factory=list)
    runs: int = 0  # runs of the result
    float64_runs: int = 0
    judged: str | None = None  # set when the float64 judgement accepted a drift
    checks: int = 0  # local checks that ran

    def to_dict(self, eager_passes: int = 0) -> dict[str, Any]:
        """``eager_passes``: the capture's recording runs, counted in ``forward_passes``."""
        out = {
            "passed": self.final.passed,
            "worst_output": self.final.worst_path,
            "max_abs_error": self.final.max_abs_error,
            "tolerance": self.final.tolerance,
            "forward_passes": eager_passes + self.runs,
            "float64_passes": self.float64_runs,
            "local_checks": self.checks,
            "undone": [u.label for u, _ in self.undone],
        }
        if self.judged:
            out["judged_against_float64"] = self.judged
        return out


def compare_outputs(reference: Any, got: Any) -> Comparison:
    """Leaf-by-leaf comparison of two output structures within the dtype tolerances."""
    ref, new = output_leaves(reference), output_leaves(got)
    if [p for p, _ in ref] != [p for p, _ in new]:
        return Comparison(False, problem="the output structure changed")
    worst = Comparison(True)
    for (path, r), (_, n) in zip(ref, new):
        if not isinstance(r, torch.Tensor):
            continue
        if not isinstance(n, torch.Tensor) or n.shape != r.shape or n.dtype != r.dtype:
            return Comparison(False, path, float("inf"), 0.0, f"{path} changed shape or dtype")
        if not r.is_floating_point():
            if not torch.equal(r, n):
                return Comparison(False, path, float("inf"), 0.0, f"{path} changed")
            continue
        rtol, atol = DEFAULT_TOLERANCES.get(r.dtype, DEFAULT_TOLERANCES[torch.float32])
        if r.dtype not in (torch.float32, torch.float64):  # half types: compare in float32
            r, n = r.float(), n.float()
        if bool(torch.isfinite(r).all()):  # the common case: no masks, no copies
            if not bool(torch.isfinite(n).all()):
                return Comparison(False, path, float("inf"), 0.0, f"{path} has new NaN/Inf values")
            scale = float(r.abs().max()) if r.numel() else 0.0
            err = float((n - r).abs().max()) if r.numel() else 0.0
        else:
            finite = torch.isfinite(r)
            if not torch.equal(finite, torch.isfinite(n)):
                return Comparison(False, path, float("inf"), 0.0, f"{path} has new NaN/Inf values")
            scale = float(r[finite].abs().max()) if bool(finite.any()) else 0.0
            err = float((n[finite] - r[finite]).abs().max()) if bool(finite.any()) else 0.0
        tol = atol + rtol * scale
        if err > tol or err != err:
            return Comparison(False, path, err, tol, f"{path} differs by {err:.3g} (tolerance {tol:.3g})")
        if err >= worst.max_abs_error:
            worst = Comparison(True, path, err, tol)
    return worst


def _run(model: nn.Module, inputs: tuple[Any, ...], checks: list[LocalCheck]) -> tuple[Any, str | None]:
    """One forward pass of the result with the local checks' hooks in place."""
    with torch.no_grad(), buffers_restored(model), eval_modes(model):
        handles = [h for c in checks for h in c.install()]
        try:
            return model(*own_copies(inputs)), None  # the model may write its inputs
        except Exception as exc:
            return None, f"the result fails on the example inputs: {type(exc).__name__}: {exc}"[:300]
        finally:
            for h in handles:
                h.remove()


def prove(
    current: Callable[[], nn.Module], inputs: tuple[Any, ...], reference: Any, units: list[Unit]
) -> Proof:
    """Check the result (all ``units`` applied) against ``reference``, the original's outputs.

    One run: every unit's local checks (see :mod:`~bnrewrite.local_checks`) compare it with
    what it replaced on the inputs it received; units that fail are undone and the result runs
    once more. If the outputs still drift while every local check passed (discrete decisions
    such as argmax or max-unpool amplify rounding), the result is judged against a float64
    evaluation of the original with ``verify``'s criterion (no worse than twice the original's
    own error); only if it fails that are the remaining units undone. ``current()`` returns the
    model as the units now make it. At most two runs and one float64 run, whatever the number
    of units."""
    proof = Proof(Comparison(True))
    proof.runs += 1
    out, crashed = _run(current(), inputs, [c for u in units for c in u.checks])
    proof.checks = sum(c.ran for u in units for c in u.checks)
    for unit in units:
        failed = [c for c in unit.checks if c.failure]
        if failed:
            unit.undo()
            code = "FD207" if any(c.code == "FD207" for c in failed) else failed[0].code
            problem = "; ".join(str(c.failure) for c in failed)
            proof.undone.append((unit, Comparison(False, problem=problem, code=code)))
    if proof.undone or crashed:
        proof.runs += 1
        out, crashed = _run(current(), inputs, [])
    proof.final = compare_outputs(reference, out) if crashed is None else Comparison(False, problem=crashed)
    if proof.final.passed:
        return proof
    active = [u for u in units if u.active]
    if crashed is None and active:
        judged = _against_float64(current, inputs, reference, out, active)
        proof.float64_runs += 1
        if judged.passed:
            proof.judged = judged.problem
            proof.final = Comparison(
                True, proof.final.worst_path, proof.final.max_abs_error, proof.final.tolerance
            )
            return proof
        why = f"{proof.final.problem}; {judged.problem}"
    else:
        why = proof.final.problem or "the result fails"
    for unit in reversed(active):  # no local check names a culprit: nothing is kept unproven
        unit.undo()
    proof.undone.extend((u, Comparison(False, problem=why)) for u in active)
    proof.final = Comparison(True, problem=None)
    return proof


def _against_float64(
    current: Callable[[], nn.Module], inputs: tuple[Any, ...], reference: Any, out: Any, active: list[Unit]
) -> Comparison:
    """``verify``'s criterion on the result's outputs: passed when every leaf is within the
    dtype tolerance of a float64 evaluation of the original, or no further from it than twice
    the original's own error. ``problem`` describes the judgement either way."""
    from bnrewrite.verify import _compare, _to64, float64_copy
    from bnrewrite.verify import _run as run_model

    for u in reversed(active):
        u.undo()
    try:
        ref = float64_copy(current())
    except Exception as exc:
        return Comparison(False, problem=f"no float64 evaluation of the original: {exc}")
    finally:
        for u in active:
            u.apply()
    try:
        ref_out = run_model(ref, tuple(_to64(x) for x in inputs), float64=True)
    except Exception as exc:
        return Comparison(False, problem=f"no float64 evaluation of the original: {exc}")
    finally:
        del ref
    leaves = zip(ref_out, output_leaves(reference), output_leaves(out))
    worst = None
    for (path, r), (_, o), (_, n) in leaves:
        if not isinstance(r, torch.Tensor) or not isinstance(n, torch.Tensor) or r.shape != n.shape:
            continue
        check = _compare(0, 0, path, r, o, n, None, None)
        if not check.passed:
            return Comparison(
                False, path, check.max_abs_error, check.tolerance,
                f"against float64, {path} is {check.max_abs_error:.3g} off, the original "
                f"{check.original_abs_error:.3g} (more than twice)",
            )  # fmt: skip
        if worst is None or check.max_abs_error > worst.max_abs_error:
            worst = check
    detail = (
        f"against float64 the result is {worst.max_abs_error:.3g} off at {worst.path}, the original "
        f"{worst.original_abs_error:.3g}: the drift is the original's own rounding (discrete decisions)"
        if worst is not None
        else "no floating-point output to judge"
    )
    return Comparison(True, problem=detail)
