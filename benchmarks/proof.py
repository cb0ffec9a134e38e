"""What the proof costs and what it keeps, on every sample and third-party network.

For each model (default options, checks on): BatchNorm calls a forward pass runs before and
after folding (the ground truth of what a fold removed), folds reported, each model's largest
error against a float64 evaluation of the original (relative to the output's largest value),
forward passes of the whole model during ``fold`` (the capture's eager pass + proof runs, as the
report counts them), float64 passes, local checks and folds undone (FD207). Then fold time on a
1x3x1024x2048 input against one forward pass.

Usage: python benchmarks/proof.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from ops import cases  # noqa: E402

import bnrewrite  # noqa: E402
from bnrewrite.precision import Float64Everywhere  # noqa: E402
from bnrewrite.verify import output_leaves  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class BatchNormCalls(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "batch_norm":
            self.n += 1
        return func(*args, **(kwargs or {}))


def batch_norms(model, inputs) -> int:
    counter = BatchNormCalls()
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.n


def float64_errors(model, folded, inputs) -> tuple[float, float]:
    """(original, folded): largest |error| against float64, relative to max |reference|."""
    ref64 = copy.deepcopy(model).double()
    with torch.no_grad(), Float64Everywhere():
        ref = output_leaves(ref64(*(x.double() if x.is_floating_point() else x for x in inputs)))
    with torch.no_grad():
        orig, new = output_leaves(model(*inputs)), output_leaves(folded(*inputs))
    worst = [0.0, 0.0]
    for (_, r), (_, o), (_, n) in zip(ref, orig, new):
        if isinstance(r, torch.Tensor) and r.is_floating_point():
            scale = float(r.abs().max()) or 1.0
            worst[0] = max(worst[0], float((o.double() - r).abs().max()) / scale)
            worst[1] = max(worst[1], float((n.double() - r).abs().max()) / scale)
    return worst[0], worst[1]


def models_section() -> None:
    print("## Folds, errors against float64 and proof cost (default options)")
    head = f"{'model':20} {'BN run':>6} {'after':>5} {'folds':>5} {'err orig':>9} {'err fold':>9}"
    print(head + f" {'passes':>6} {'f64':>3} {'checks':>6} {'undone':>6}")
    for name, model, inputs in cases():
        folded, report = bnrewrite.fold(model, inputs)
        proof = report.extra.get("proof", {})
        e_orig, e_fold = float64_errors(model, folded, inputs)
        undone = sum(d.code == "FD207" for d in report.diagnostics)
        print(
            f"{name:20} {batch_norms(model, inputs):6d} {batch_norms(folded, inputs):5d} "
            f"{sum(a.kind.startswith('fold') or a.kind == 'merge-branches' for a in report.actions):5d} {e_orig:9.2e} {e_fold:9.2e} "
            f"{proof.get('forward_passes', 0):6d} {proof.get('float64_passes', 0):3d} "
            f"{proof.get('local_checks', 0):6d} {undone:6d}"
        )


def large_section() -> None:
    from fold import segmentation_net

    print("\n## Fold on a 1x3x1024x2048 input, against one forward pass")
    import samples.enet as enet

    for label, model in (("segmentation net", segmentation_net()), ("ENet-like sample", enet.build())):
        x = torch.randn(1, 3, 1024, 2048)
        with torch.no_grad():
            model(x)
            t = time.perf_counter()
            model(x)
            t_forward = time.perf_counter() - t
        t = time.perf_counter()
        _folded, report = bnrewrite.fold(model, (x,))
        t_fold = time.perf_counter() - t
        proof = report.extra["proof"]
        print(
            f"{label}: fold {t_fold:.2f} s = {t_fold / t_forward:.2f} forward passes' time; proof reports "
            f"{proof['forward_passes']} forward passes, {proof['float64_passes']} float64, "
            f"{proof['local_checks']} local checks, {len(proof['undone'])} undone"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the large-input section")
    args = ap.parse_args()
    models_section()
    if not args.quick:
        large_section()


if __name__ == "__main__":
    main()
