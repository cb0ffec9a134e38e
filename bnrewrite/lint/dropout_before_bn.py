"""BN006: dropout feeding a BatchNorm shifts its input variance between training and inference."""

from __future__ import annotations

from collections.abc import Iterator

from bnrewrite.diagnostics import Diagnostic
from bnrewrite.lint.context import RuleContext
from bnrewrite.semantics.layers import is_dropout

CODE = "BN006"


def check(ctx: RuleContext) -> Iterator[Diagnostic]:
    for site in ctx.bn_sites:
        if site.input is not None and is_dropout(site.region, site.input):
            yield ctx.diagnostic(
                CODE, f"dropout {site.input.name} feeds this BatchNorm directly", site.region, site.call
            )
