"""BN003: running statistics still at their initial values (mean 0, var 1, no batches seen)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bnrewrite.diagnostics import Diagnostic
from bnrewrite.lint.context import RuleContext

CODE = "BN003"


def check(ctx: RuleContext) -> Iterator[Diagnostic]:
    for site in ctx.bn_sites:
        mean, var, seen = site.running_mean, site.running_var, site.num_batches_tracked
        if mean is None or var is None or site.frozen:
            continue
        if seen is not None and int(seen) != 0:
            continue
        if bool(torch.all(mean == 0)) and bool(torch.all(var == 1)):
            yield ctx.diagnostic(
                CODE, "running statistics were never updated (mean 0, var 1)", site.region, site.call
            )
