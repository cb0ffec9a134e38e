"""BN001: a conv/linear bias directly before a BatchNorm is cancelled by the mean subtraction."""

from __future__ import annotations

from collections.abc import Iterator

from bnrewrite.diagnostics import Diagnostic
from bnrewrite.lint.context import RuleContext
from bnrewrite.semantics.layers import layer_site

CODE = "BN001"


def check(ctx: RuleContext) -> Iterator[Diagnostic]:
    for site in ctx.bn_sites:
        if site.input is None or len(site.input.users) != 1:
            continue
        layer = layer_site(site.region, site.input)
        if layer is not None and layer.bias is not None:
            label = layer.module_path or layer.name
            yield ctx.diagnostic(
                CODE, f"bias of {label} is redundant: BatchNorm subtracts the mean", site.region, site.input
            )
