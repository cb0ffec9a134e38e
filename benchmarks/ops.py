"""A fold never adds work: executed ATen ops and latency, before and after `bnrewrite.fold`.

For every sample and third-party network (MONAI, efficientnet_pytorch, built without weights)
the ATen ops one forward pass executes are counted with a ``TorchDispatchMode`` (every op,
views included), on the original model and on the folded one; the folded model must never
execute more. Latency is the median over interleaved rounds of folded / original.

Second table: every sample with branches meant to be merged (RepVGG, ACNet, DBB, MobileOne,
RepConv, RepMixer), folded by bnrewrite with default options and re-parameterized by the
sample's own hand-written per-class code: executed ops of each (bnrewrite must be within 5 %
of the hand-written result), and latency bnrewrite / hand-written.

Usage: python benchmarks/ops.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
import warnings
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bnrewrite  # noqa: E402
from samples._stats import trained  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_ops(model, inputs) -> Counter[str]:
    with torch.no_grad(), OpCounter() as counter:
        model(*inputs)
    return counter.ops


def latency_ratio(a, b, inputs, rounds: int) -> float:
    ratios = []
    with torch.no_grad():
        for _ in range(3):
            a(*inputs), b(*inputs)
        for i in range(rounds):
            first, second = (a, b) if i % 2 == 0 else (b, a)
            t0 = time.perf_counter()
            first(*inputs)
            t1 = time.perf_counter()
            second(*inputs)
            t2 = time.perf_counter()
            ta, tb = (t1 - t0, t2 - t1) if first is a else (t2 - t1, t1 - t0)
            ratios.append(ta / tb)
    return statistics.median(ratios)


def cases():
    for name in importlib.import_module("samples").NAMES:
        mod = importlib.import_module(f"samples.{name}")
        yield name, mod.build(), mod.example_inputs()
    try:
        from monai.networks import nets
    except ImportError:
        nets = None
    if nets is not None:
        torch.manual_seed(0)
        yield (
            "monai UNet",
            trained(nets.UNet(2, 1, 2, (8, 16, 32), (2, 2), num_res_units=1, norm="batch")),
            (torch.randn(1, 1, 64, 64),),
        )
        yield (
            "monai BasicUNet",
            trained(nets.BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4), norm="batch")),
            (torch.randn(1, 1, 64, 64),),
        )
        yield (
            "monai SegResNet",
            trained(nets.SegResNet(2, 8, 1, 2, norm="batch")),
            (torch.randn(1, 1, 64, 64),),
        )
        yield (
            "monai DynUNet",
            trained(nets.DynUNet(2, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], norm_name="batch")),
            (torch.randn(1, 1, 64, 64),),
        )
        yield (
            "monai DenseNet121",
            trained(nets.DenseNet121(2, 1, 3, init_features=8, growth_rate=4)),
            (torch.randn(2, 1, 64, 64),),
        )
    try:
        from efficientnet_pytorch import EfficientNet
    except ImportError:
        return
    torch.manual_seed(0)
    yield "efficientnet-b0", trained(EfficientNet.from_name("efficientnet-b0")), (torch.randn(1, 3, 96, 96),)


REP_SAMPLES = ["repvgg", "acnet", "dbb", "mobileone", "repconv", "repmixer"]


def against_hand_written(rounds: int) -> None:
    """bnrewrite's default fold against each sample's own reparameterization."""
    print()
    print("## Merged branches: bnrewrite fold vs the sample's hand-written reparameterization")
    print(
        f"{'model':10} {'ops before':>10} {'bnrewrite':>9} {'hand':>5} {'ratio':>6} {'latency vs hand':>15}"
    )
    over = []
    for name in REP_SAMPLES:
        mod = importlib.import_module(f"samples.{name}")
        model, inputs = mod.build(), mod.example_inputs()
        folded, _ = bnrewrite.fold(model, inputs)
        hand = mod.reparameterize(model)
        before = sum(count_ops(model, inputs).values())
        ours, theirs = sum(count_ops(folded, inputs).values()), sum(count_ops(hand, inputs).values())
        ratio = latency_ratio(folded, hand, inputs, rounds)
        print(f"{name:10} {before:10d} {ours:9d} {theirs:5d} {ours / theirs:6.2f} {ratio:15.3f}")
        if ours > 1.05 * theirs:
            over.append(name)
    assert not over, f"more than 5 % over the hand-written reparameterization: {over}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds = 15 if args.quick else 60
    against_hand_written(rounds)
    print("## Executed ATen ops per forward pass, and latency, folded vs original")
    print(
        f"{'model':20} {'BN':>4} {'folded':>6} {'kept':>5} {'ops before':>10} {'ops after':>9} {'latency':>8}"
    )
    worse = []
    for name, model, inputs in cases():
        folded, _ = bnrewrite.fold(model, inputs)
        norms = [
            n for n in bnrewrite.analyze(model, inputs).norms if n.family in ("batch", "frozen", "affine")
        ]
        n_bn = len(norms)
        done = sum(n.verdict != "not-foldable" for n in norms)  # folded, or merged with its branches
        before, after = count_ops(model, inputs), count_ops(folded, inputs)
        ratio = latency_ratio(folded, model, inputs, rounds)
        total_b, total_a = sum(before.values()), sum(after.values())
        print(f"{name:20} {n_bn:4d} {done:6d} {n_bn - done:5d} {total_b:10d} {total_a:9d} {ratio:8.3f}")
        if total_a > total_b:
            worse.append((name, before, after))
    for name, before, after in worse:
        more = {k: after[k] - before[k] for k in after if after[k] > before[k]}
        print(f"MORE OPS after folding {name}: {more}")
    assert not worse, "a fold added work"


if __name__ == "__main__":
    main()
