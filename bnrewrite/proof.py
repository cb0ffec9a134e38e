"""Proof and rollback: a fold never returns a model that fails on the inputs it was given.

After folding, the result runs once on the example inputs and every output leaf is compared with
the original's outputs recorded in the capture's eager pass (eval mode, same dtype), within the
dtype tolerances ``verify`` uses (``atol + rtol * max|ref|``). When the comparison fails, the
applied units are bisected - each test is one forward pass, with the old tensors still held -
and every unit that makes the result drift is undone and reported (FD207); the rest stay.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .graph.capture import buffers_restored, eval_modes
from .passes.tree_edit import Unit
from .verify import DEFAULT_TOLERANCES, output_leaves


@dataclass
class Comparison:
    passed: bool
    worst_path: str | None = None
    max_abs_error: float = 0.0
    tolerance: float = 0.0
    problem: str | None = None


@dataclass
class Proof:
    """What the proof found: the final comparison, the units undone, the forward passes run."""

    final: Comparison
    undone: list[tuple[Unit, Comparison]] = field(default_factory=list)
    runs: int = 0
    deterministic: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.final.passed,
            "worst_output": self.final.worst_path,
            "max_abs_error": self.final.max_abs_error,
            "tolerance": self.final.tolerance,
            "forward_passes": self.runs,
            "undone": [u.label for u, _ in self.undone],
            "deterministic": self.deterministic,
        }


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


def prove(
    current: Callable[[], nn.Module], inputs: tuple[Any, ...], reference: Any, units: list[Unit]
) -> Proof:
    """Check the result (all ``units`` applied) against ``reference``; bisect and undo the
    units that make it drift. ``current()`` returns the model as the units now make it."""
    proof = Proof(Comparison(True))

    def check() -> Comparison:
        proof.runs += 1
        model = current()
        try:
            with torch.no_grad(), buffers_restored(model), eval_modes(model):
                out = model(*inputs)
        except Exception as exc:
            return Comparison(False, problem=f"the result fails on the example inputs: {type(exc).__name__}")
        return compare_outputs(reference, out)

    proof.final = check()
    if proof.final.passed or not units:
        return proof
    for u in reversed(units):
        u.undo()
    if not check().passed:  # the untouched model does not reproduce its own outputs
        proof.deterministic = False
        for u in units:
            u.apply()
        proof.final = Comparison(True, problem="the model's outputs vary between runs: not proven")
        return proof

    def search(cands: list[Unit]) -> None:
        for u in cands:
            u.apply()
        result = check()
        if result.passed:
            return
        for u in reversed(cands):
            u.undo()
        if len(cands) == 1:
            proof.undone.append((cands[0], result))
            return
        half = len(cands) // 2
        search(cands[:half])
        search(cands[half:])

    search(list(units))
    proof.final = check()
    return proof
