"""``fold(..., norm_affine=True)`` on real transformer and MLP models of the vision-model library.

Runs in the real-library environment (``../shared/corpora/timm-venv.sh``), never in CI. For each
model (random weights, every norm affine random): the per-sample norm modules (LayerNorm, RMSNorm,
GroupNorm and their subclasses), the affines folded (FD112 actions) and refused (FD112 findings,
with the most common reasons), whether the proof passed with nothing undone, and ``verify``
against float64 (error against the original's own). A total line at the end.

Usage: PY=$(../shared/corpora/timm-venv.sh) && $PY benchmarks/norm_affine.py [--models a,b]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
import warnings
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = [
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
    "convnext_atto",
    "convnext_atto_rms",
    "mixer_s16_224",
    "gmlp_ti16_224",
    "pvt_v2_b0",
    "poolformer_s12",
    "mobilevitv2_050",
    "xcit_nano_12_p16_224",
    "coat_tiny",
    "crossvit_tiny_240",
    "levit_128s",
]


def _randomized(model):
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            for name in ("weight", "bias"):
                p = m._parameters.get(name)
                if p is not None and p.dim() == 1 and _is_norm(m):
                    lo, hi = (0.5, 1.5) if name == "weight" else (-0.5, 0.5)
                    p.copy_(torch.rand(p.shape, generator=g) * (hi - lo) + lo)
    return model.eval()


def _is_norm(m) -> bool:
    from torch import nn

    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or (
        type(m).__name__.lower().endswith(("rmsnorm", "layernorm", "layernorm2d", "groupnorm1"))
    )


def _reason(message: str) -> str:
    why = message.split(": ", 2)[-1]
    return re.sub(r"\S*_\d+|\S+\.\S+", "X", why)[:70]


def one(name: str) -> tuple[int, int, int, bool, bool, Counter]:
    import timm
    import torch

    import bnrewrite

    model = _randomized(timm.create_model(name, pretrained=False))
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = (torch.randn(1, *size, generator=torch.Generator().manual_seed(1)),)
    norms = sum(_is_norm(m) for m in model.modules())
    t0 = time.perf_counter()
    folded, report = bnrewrite.fold(model, x, norm_affine=True)
    seconds = time.perf_counter() - t0
    done = sum(a.code == "FD112" for a in report.actions)
    refused = [d for d in report.diagnostics if d.code == "FD112"]
    proof = report.extra.get("proof") or {}
    proof_ok = bool(proof.get("passed")) and not proof.get("undone")
    result = bnrewrite.verify(model, folded, x, random_sets=0)
    worst = max(result.checks, key=lambda c: c.max_abs_error / max(c.original_abs_error, 1e-30))
    err = worst.max_abs_error / max(worst.original_abs_error, 1e-30)
    print(
        f"{name:30} norms {norms:3d}  folded {done:3d}  refused {len(refused):3d}  "
        f"proof {'ok' if proof_ok else 'NO'}  verify {'ok' if result.passed else 'NO'}  err {err:.2f}x  {seconds:.2f}s",
        flush=True,
    )
    return norms, done, len(refused), proof_ok, result.passed, Counter(_reason(d.message) for d in refused)


def main() -> int:
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    names = args.models.split(",")
    totals = [0, 0, 0, 0, 0]
    reasons: Counter = Counter()
    for name in names:
        try:
            norms, done, refused, proof_ok, verified, why = one(name)
        except Exception as exc:  # a model that does not build or run here: said, not hidden
            print(f"{name:30} failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        totals = [a + b for a, b in zip(totals, [norms, done, refused, proof_ok, verified])]
        reasons.update(why)
    print(
        f"TOTAL {len(names)} models; norm modules {totals[0]}; affines folded {totals[1]}, refused {totals[2]}; "
        f"proof passed {totals[3]}/{len(names)}; verify passed {totals[4]}/{len(names)}"
    )
    for why, n in reasons.most_common(6):
        print(f"  refused {n:3d}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
