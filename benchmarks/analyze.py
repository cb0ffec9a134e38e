"""analyze against fold on the same model with inputs, in one process, and as a CLI user pays it.

``analyze`` is capture + plan + rules: no second capture, no folded weights, no proof. Prints
analyze / fold wall time (best of nine interleaved rounds) for every sample and third-party network, then the
cold CLI run (fresh process each) of ``bnrewrite analyze`` against ``bnrewrite fold`` on the
largest third-party network (MONAI DenseNet121, ``benchmarks/nets.py:densenet121``).

Usage: python benchmarks/analyze.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from ops import cases  # noqa: E402

import bnrewrite  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def in_process(repeats: int) -> list[float]:
    """Best of ``repeats`` interleaved rounds (analyze, then fold, in each): both see the same
    machine load, and the first round pays the one-time warm-up for both."""
    print(f"## analyze / fold, same model with inputs (best of {repeats} interleaved rounds)")
    print(f"{'model':20} {'analyze s':>9} {'fold s':>7} {'ratio':>6}")
    ratios = []
    for name, model, inputs in cases():
        bnrewrite.analyze(model, inputs), bnrewrite.fold(model, inputs)  # warm-up
        t_a, t_f = [], []
        for _ in range(repeats if name != "dbb" else min(repeats, 3)):  # dbb: 2 s per round
            t_a.append(timed(lambda m=model, x=inputs: bnrewrite.analyze(m, x)))
            t_f.append(timed(lambda m=model, x=inputs: bnrewrite.fold(m, x)))
        a, f = min(t_a), min(t_f)
        ratios.append(a / f)
        print(f"{name:20} {a:9.3f} {f:7.3f} {a / f:6.2f}")
    print(f"ratio: median {statistics.median(ratios):.2f}, max {max(ratios):.2f}")
    print(f"models at or under 0.7: {sum(r <= 0.7 for r in ratios)} of {len(ratios)}")
    return ratios


def cold_cli(repeats: int) -> None:
    print("\n## Cold CLI runs (fresh process each), MONAI DenseNet121, 2x1x64x64")
    exe = os.path.join(os.path.dirname(sys.executable), "bnrewrite")
    spec = "nets:densenet121"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "benchmarks")}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            "analyze": [exe, "analyze", spec, "--json"],
            "fold": [exe, "fold", spec, "-o", os.path.join(tmp, "out.pt"), "--force", "--json"],
        }
        took: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats):
            for key, cmd in runs.items():
                t = time.perf_counter()
                subprocess.run(cmd, env=env, capture_output=True, check=True, cwd=ROOT)
                took[key].append(time.perf_counter() - t)
    a, f = min(took["analyze"]), min(took["fold"])
    print(f"analyze {a:.2f} s, fold {f:.2f} s: ratio {a / f:.2f} (best of {repeats})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    in_process(2 if args.quick else 9)
    cold_cli(1 if args.quick else 3)


if __name__ == "__main__":
    main()
