"""BN004: non-finite or non-positive running_var, or non-finite running_mean/affine."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..diagnostics import Diagnostic
from .context import RuleContext

CODE = "BN004"


def check(ctx: RuleContext) -> Iterator[Diagnostic]:
    for site in ctx.bn_sites:
        problems = []
        var = site.running_var
        if var is not None:
            if not bool(torch.isfinite(var).all()):
                problems.append("running_var has NaN/Inf")
            elif bool((var <= 0).any()):
                problems.append(f"running_var has {int((var <= 0).sum())} non-positive value(s)")
        for name, t in (("running_mean", site.running_mean), ("weight", site.weight), ("bias", site.bias)):
            if t is not None and not bool(torch.isfinite(t).all()):
                problems.append(f"{name} has NaN/Inf")
        if problems:
            yield ctx.diagnostic(CODE, "; ".join(problems), site.region, site.call)
