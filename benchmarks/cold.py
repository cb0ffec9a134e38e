"""The fold as a CLI user pays it: the first call in a fresh process, against torch.fx's ``fuse``.

Every figure is a median over ``--runs`` fresh processes (the allocator moves a single figure a
lot). Each process imports torch and bnrewrite, builds the model, then times one *cold* call
(what ``bnrewrite fold`` pays) and, for the warm figure beside it, the best of two more calls. The
extra peak memory (resident-set high-water mark over the cold call, ``/proc/self/status``) is
divided by the model's size; the process keeps glibc's default allocator, as a user's does (``--pinned-malloc``: freed memory
goes back to the OS at once, so the peak is what the rewrite itself holds).

Modes: ``fuse`` (torch.fx), ``fold`` (example inputs: capture, eager recording, plan, apply,
proof), ``fold-noinputs``, ``fold-inplace``, ``fold-noproof`` (``prove=False``) and
``forward`` (one eval forward pass of the model on the same inputs). The proof's cost is timed
inside the cold ``fold`` call itself and divided by one forward pass of the model timed in the
same process right after (the difference of two medians, ``fold - fold-noproof``, is too noisy).

Models: the 300-block synthetic ResNet of ``benchmarks/fold.py`` (64 channels, 16x16 input), or
with ``--timm PYTHON`` a model of the vision-model library (``--model resnet152``, 224x224).

Usage: python benchmarks/cold.py [--runs 5] [--blocks 300]
       python benchmarks/cold.py --timm "$(../shared/corpora/timm-venv.sh)" --model resnet152
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("fuse", "fold", "fold-noinputs", "fold-inplace", "fold-noproof", "forward")


def _build(model_name: str, blocks: int):
    import torch

    if model_name == "synthetic":
        sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
        from fold import synthetic_resnet  # the same network as benchmarks/fold.py

        return synthetic_resnet(blocks), (
            torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)),
        )
    import timm
    from corpus import _seeded

    model = _seeded(timm.create_model(model_name, pretrained=False))
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    return model, (torch.randn(1, *size, generator=torch.Generator().manual_seed(1)),)


def worker(mode: str, model_name: str, blocks: int, threads: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch
    from fold import _status  # benchmarks/fold.py: the same /proc/self/status reader
    from torch.fx.experimental.optimization import fuse

    import bnrewrite

    torch.set_num_threads(threads)
    model, x = _build(model_name, blocks)
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

    def call():
        if mode == "fuse":
            return fuse(model)
        if mode == "forward":
            with torch.no_grad():
                return model(*x)
        kwargs = {
            "fold": {},
            "fold-noinputs": {},
            "fold-inplace": {"inplace": True},
            "fold-noproof": {"prove": False},
        }[mode]
        return bnrewrite.fold(model, None if mode == "fold-noinputs" else x, **kwargs)

    proof_s: list[float] = []
    folding = sys.modules["bnrewrite.fold"]
    prove = folding.prove_units

    def timed_prove(*a, **k):  # the proof's share of this very call
        t = time.perf_counter()
        try:
            return prove(*a, **k)
        finally:
            proof_s.append(time.perf_counter() - t)

    folding.prove_units = timed_prove
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS:")
    t0 = time.perf_counter()
    result = call()
    cold = time.perf_counter() - t0
    extra = _status("VmHWM:") - base
    del result
    forward = []
    if mode == "fold":  # one forward pass of the model, in this process, for the proof's ratio
        with torch.no_grad():
            for _ in range(3):
                t0 = time.perf_counter()
                model(*x)
                forward.append(time.perf_counter() - t0)
    warm = []
    if mode != "fold-inplace":  # (the model is folded already)
        for _ in range(2):
            gc.collect()
            t0 = time.perf_counter()
            call()
            warm.append(time.perf_counter() - t0)
    ratio = proof_s[0] / min(forward) if proof_s and forward else None
    print(
        json.dumps(
            {"cold": cold, "warm": min(warm) if warm else None, "extra": extra, "size": size, "proof": ratio}
        )
    )


def measure(python: str, mode: str, model: str, blocks: int, threads: int, pinned: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT}
    if pinned:  # freed tensors go back to the OS: the peak is what the rewrite holds, not the heap
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    cmd = [
        python,
        __file__,
        "--worker",
        mode,
        "--model",
        model,
        "--blocks",
        str(blocks),
        "--threads",
        str(threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=300)
    ap.add_argument("--model", default="synthetic")
    ap.add_argument("--timm", default=None, help="python of an environment with timm (corpora/timm-venv.sh)")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument(
        "--pinned-malloc", action="store_true", help="glibc's mmap threshold pinned (as benchmarks/fold.py)"
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.blocks, args.threads)
        return
    python = args.timm or sys.executable
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.runs):  # interleaved: machine load hits every mode alike
        for mode in modes:
            runs[mode].append(
                measure(python, mode, args.model, args.blocks, args.threads, args.pinned_malloc)
            )
    med = {
        m: {k: statistics.median(r[k] for r in rs if r[k] is not None) for k in ("cold", "extra", "size")}
        for m, rs in runs.items()
    }
    warm = {
        m: statistics.median(r["warm"] for r in rs if r["warm"] is not None)
        for m, rs in runs.items()
        if any(r["warm"] for r in rs)
    }
    name = f"{args.blocks}-block synthetic ResNet" if args.model == "synthetic" else args.model
    malloc = "mmap threshold pinned" if args.pinned_malloc else "default allocator"
    print(f"## {name}: medians of {args.runs} fresh processes, {args.threads} thread(s), {malloc}")
    for m in modes:
        w = f"{warm[m]:.3f}s" if m in warm else "-"
        print(
            f"{m:14} cold {med[m]['cold']:.3f}s  warm {w:>8}  extra peak memory {med[m]['extra'] / med[m]['size']:.2f}x model"
        )
    if "fuse" in med:
        fuse_cold, fuse_warm = med["fuse"]["cold"], warm.get("fuse")
        for m in ("fold", "fold-noinputs"):
            if m in med:
                ratio_w = f"{warm[m] / fuse_warm:.2f}" if fuse_warm and m in warm else "-"
                print(f"{m} / fuse: cold {med[m]['cold'] / fuse_cold:.2f}x, warm {ratio_w}x")
    if "fold" in runs:
        ratios = [r["proof"] for r in runs["fold"] if r.get("proof") is not None]
        if ratios:
            print(
                f"proof inside the cold fold / one forward pass in the same process: median "
                f"{statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f})"
            )
    for m in ("fold", "fold-inplace"):
        if m in med:
            print(f"extra peak memory, {m}: {med[m]['extra'] / med[m]['size']:.2f}x the model")


if __name__ == "__main__":
    main()
