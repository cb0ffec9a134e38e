"""BN010: one conv/linear module (or stored weight) used at several call sites."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from torch import fx

from bnrewrite.diagnostics import Diagnostic
from bnrewrite.lint.context import RuleContext
from bnrewrite.semantics import ops
from bnrewrite.semantics.layers import layer_site

CODE = "BN010"


def check(ctx: RuleContext) -> Iterator[Diagnostic]:
    for region in ctx.cap.regions:
        calls: dict[str, list[fx.Node]] = defaultdict(list)
        for node in region.gm.graph.nodes:
            if node.op not in ("call_module", "call_function") or layer_site(region, node) is None:
                continue
            if node.op == "call_module":
                calls[str(node.target)].append(node)
            else:
                _kind, names = ops.LAYER_TARGETS[node.target]
                weight = ops.bind(node, names).get("weight")
                if isinstance(weight, fx.Node) and weight.op == "get_attr":
                    calls[str(weight.target)].append(node)
        for key, nodes in calls.items():
            if len(nodes) > 1:
                sites = ", ".join(n.name for n in nodes)
                yield ctx.diagnostic(
                    CODE, f"{key} is called at {len(nodes)} places ({sites})", region, nodes[0]
                )
