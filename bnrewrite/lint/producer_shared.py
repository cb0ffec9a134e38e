"""BN009: the conv/linear feeding a BatchNorm has other users, which blocks a plain fold."""

from __future__ import annotations

from collections.abc import Iterator

from bnrewrite.diagnostics import Diagnostic
from bnrewrite.lint.context import RuleContext
from bnrewrite.semantics.layers import layer_site

CODE = "BN009"


def check(ctx: RuleContext) -> Iterator[Diagnostic]:
    for site in ctx.bn_sites:
        src = site.input
        if src is None or len(src.users) < 2 or layer_site(site.region, src) is None:
            continue
        others = ", ".join(u.name for u in src.users if u is not site.call)
        yield ctx.diagnostic(
            CODE, f"producer {src.name} is also used by {others}: no plain fold", site.region, site.call
        )
