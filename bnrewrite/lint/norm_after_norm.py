"""BN007: a norm whose input is another norm's output (the second mostly undoes the first)."""

from __future__ import annotations

from collections.abc import Iterator

from bnrewrite.diagnostics import Diagnostic
from bnrewrite.lint.context import RuleContext

CODE = "BN007"


def check(ctx: RuleContext) -> Iterator[Diagnostic]:
    outputs = {id(s.node): s for s in ctx.bn_sites}
    outputs.update({id(o.node): o for o in ctx.other_norms})
    items = [(s.region, s.call, s.input) for s in ctx.bn_sites]
    items += [(o.region, o.node, o.node.args[0] if o.node.args else None) for o in ctx.other_norms]
    for region, node, src in items:
        prev = outputs.get(id(src))
        if prev is not None:
            label = prev.module_path or prev.name
            yield ctx.diagnostic(CODE, f"normalizes the output of norm {label} again", region, node)
