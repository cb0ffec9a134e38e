"""What folding does to low precision, and what cross-layer equalization gives back.

Per network (ReLU networks with realistic BatchNorm statistics): the end-to-end output SQNR (dB)
with every conv/linear weight quantized to int8 per tensor (activations in float), for
``fold`` alone and for ``fold`` + ``equalize``; the mean per-tensor int8 weight SQNR over the
equalized layers; whether float64 ``verify`` passes on the equalized model; equalize's time.

Networks: the MobileNetV1 of ``samples/mobilenet_v1.py`` (input 8x3x64x64); a ResNet-style
network (``samples/resnet.py``) and a merged RepVGG-style model (``samples/repvgg.py``), both
given the same statistics. Then the planted cases of ``samples/precision_cases.py``: the code
each one gets from ``analyze`` and from ``fold``.

Usage: python benchmarks/precision.py
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bnrewrite  # noqa: E402
from bnrewrite.equalize import int8_output_sqnr  # noqa: E402
from samples import mobilenet_v1, precision_cases, repvgg, resnet  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _networks():
    yield "MobileNetV1", mobilenet_v1.build(), mobilenet_v1.example_inputs()
    for name, sample in (("ResNet (sample)", resnet), ("RepVGG (sample, merged)", repvgg)):
        inputs = sample.example_inputs()
        net = mobilenet_v1.realistic_statistics(sample.build(), shape=(64, *inputs[0].shape[1:]))
        yield name, net, inputs


def main() -> int:
    print(
        "network                   fold only   fold+equalize   gain    weight SQNR before/after   verify   time"
    )
    worst_gain = None
    for name, model, inputs in _networks():
        folded, _ = bnrewrite.fold(model, inputs)
        t0 = time.perf_counter()
        equalized, report = bnrewrite.equalize(model, inputs)
        seconds = time.perf_counter() - t0
        a, b = int8_output_sqnr(folded, inputs), int8_output_sqnr(equalized, inputs)
        gain = b - a
        worst_gain = gain if worst_gain is None else min(worst_gain, gain)
        w = report.extra["int8_weight_sqnr_db"]
        ok = (report.verification or {}).get("passed")
        print(
            f"{name:<25} {a:8.1f} dB  {b:10.1f} dB  {gain:+6.1f}   {w['before']!s:>9} / {w['after']!s:<9} dB   "
            f"{ok!s:<6}  {seconds:.2f}s"
        )
    print(f"smallest gain: {worst_gain:+.1f} dB")
    print("\nplanted cases (samples/precision_cases.py): code -> layer, in analyze and in fold")
    model, inputs = precision_cases.build(), precision_cases.example_inputs()
    for command, report in (
        ("analyze", bnrewrite.analyze(model, inputs)),
        ("fold", bnrewrite.fold(model, inputs).report),
        ("fold --target-dtype fp16", bnrewrite.fold(model, inputs, target_dtype=torch.float16).report),
    ):
        found = sorted({(d.code, d.module_path) for d in report.diagnostics if d.code[:2] in ("PR", "FD")})
        print(f"  {command:<25} " + ", ".join(f"{c} {p}" for c, p in found if c != "FD101"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
