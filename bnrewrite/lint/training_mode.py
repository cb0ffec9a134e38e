"""BN002: a BatchNorm in training mode normalizes with batch statistics and cannot be folded."""

from __future__ import annotations

from collections.abc import Iterator

from bnrewrite.diagnostics import Diagnostic
from bnrewrite.lint.context import RuleContext

CODE = "BN002"


def check(ctx: RuleContext) -> Iterator[Diagnostic]:
    for site in ctx.bn_sites:
        if site.training and site.tracks_stats:
            yield ctx.diagnostic(CODE, "BatchNorm is in training mode", site.region, site.call)
