"""BN005: track_running_stats=False, so inference uses batch statistics and cannot be folded."""

from __future__ import annotations

from collections.abc import Iterator

from bnrewrite.diagnostics import Diagnostic
from bnrewrite.lint.context import RuleContext

CODE = "BN005"


def check(ctx: RuleContext) -> Iterator[Diagnostic]:
    for site in ctx.bn_sites:
        if not site.tracks_stats:
            yield ctx.diagnostic(
                CODE,
                "no running statistics: outputs depend on the batch at inference",
                site.region,
                site.call,
            )
