"""Why FD108 exists: a transposed conv that gains a bias can be slower than the same layer plus a
BatchNorm. Prints, for the README:

- per layer configuration, latency of ``ConvTranspose2d`` *with* a bias / the same layer without
  one followed by its BatchNorm (median of interleaved rounds, the machine's threads as set);
- on the ``decoder`` sample: latency of the model folded with every BatchNorm
  (``speed_check=False``) / the original, and of the default fold (FD108 keeps the slower ones)
  / the original, with how many BatchNorms each folds.

Usage: python benchmarks/fd108.py [--rounds 200] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bnrewrite  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from fold import latency_ratio as ratio  # noqa: E402  (median of interleaved rounds)

warnings.filterwarnings("ignore")

# (label, in, out, kernel, stride, groups, input shape)
LAYERS = [
    ("64->64 1x1", 64, 64, 1, 1, 1, (2, 64, 32, 32)),
    ("depthwise 3x3", 64, 64, 3, 1, 64, (2, 64, 32, 32)),
    ("grouped 1x1 (g=4)", 64, 64, 1, 1, 4, (2, 64, 32, 32)),
    ("k2s2 64->32", 64, 32, 2, 2, 1, (2, 64, 16, 16)),
    ("k3s2 64->32", 64, 32, 3, 2, 1, (2, 64, 16, 16)),
    ("k4s2 64->32", 64, 32, 4, 2, 1, (2, 64, 16, 16)),
]


def layers_section(rounds: int) -> None:
    print("## ConvTranspose2d with a bias / without one + BatchNorm (median of interleaved rounds)")
    for label, cin, cout, k, s, g, shape in LAYERS:
        with_bias = nn.ConvTranspose2d(cin, cout, k, s, groups=g, bias=True).eval()
        plain = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, k, s, groups=g, bias=False), nn.BatchNorm2d(cout)
        ).eval()
        print(
            f"{label:20} on {'x'.join(map(str, shape)):12} {ratio(with_bias, plain, torch.randn(*shape), rounds):.2f}"
        )


def decoder_section(rounds: int) -> None:
    from samples import decoder

    model, inputs = decoder.build(), decoder.example_inputs()
    x = inputs[0]
    everything, r_all = bnrewrite.fold(model, inputs, speed_check=False)
    default, r_def = bnrewrite.fold(model, inputs)

    def folds(report) -> int:
        return sum(a.kind.startswith("fold") for a in report.actions)

    print("\n## decoder sample: latency folded / original (median of interleaved rounds)")
    print(
        f"every BatchNorm folded (--no-speed-check, {folds(r_all)} folds): {ratio(everything, model, x, rounds):.2f}"
    )
    print(
        f"default (FD108 keeps the slower folds, {folds(r_def)} folds): {ratio(default, model, x, rounds):.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"(torch {torch.__version__}, {args.threads} thread(s))")
    layers_section(args.rounds)
    decoder_section(args.rounds)


if __name__ == "__main__":
    main()
