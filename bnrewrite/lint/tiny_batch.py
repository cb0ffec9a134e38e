"""BN008: batch size 1 with a BatchNorm in training mode (suggest GroupNorm)."""

from __future__ import annotations

from collections.abc import Iterator

from bnrewrite.diagnostics import Diagnostic
from bnrewrite.lint.context import RuleContext
from bnrewrite.semantics.shapes import shape_lookup

CODE = "BN008"


def check(ctx: RuleContext) -> Iterator[Diagnostic]:
    if ctx.cap.example_inputs is None:
        return
    shape_of = shape_lookup(ctx.cap).shape
    for site in ctx.bn_sites:
        if not site.training or site.input is None:
            continue
        shape = shape_of(site.input)
        if shape and shape[0] == 1:
            yield ctx.diagnostic(
                CODE,
                "batch size 1 in training mode: batch statistics are noisy; consider GroupNorm",
                site.region,
                site.call,
            )
