"""BN004: non-finite or non-positive running_var, or non-finite running_mean/affine."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bnrewrite.diagnostics import Diagnostic
from bnrewrite.lint.context import RuleContext
from bnrewrite.semantics.norms import BNSite

CODE = "BN004"


def check(ctx: RuleContext) -> Iterator[Diagnostic]:
    if _all_fine(ctx.bn_sites):  # the common case, in a few ops for the whole model
        return
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


def _all_fine(sites: list[BNSite]) -> bool:
    """True when every site's tensors are finite and every running_var positive: one check over
    all of them (per-site checks cost several small ops per BatchNorm). Tensors that cannot be
    joined (several devices) give False: then each site is checked on its own."""
    values = [
        t.detach().reshape(-1)
        for s in sites
        for t in (s.running_mean, s.running_var, s.weight, s.bias)
        if isinstance(t, torch.Tensor)
    ]
    variances = [s.running_var.detach().reshape(-1) for s in sites if isinstance(s.running_var, torch.Tensor)]
    if not values:
        return True
    try:
        finite = bool(torch.isfinite(torch.cat(values)).all())
        return finite and (not variances or bool((torch.cat(variances) > 0).all()))
    except (RuntimeError, TypeError):
        return False
