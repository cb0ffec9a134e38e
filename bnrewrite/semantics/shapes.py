"""Shapes of graph values, found the cheapest way that knows them: recorded by the graph, by the
capture's eager pass, or (once, the first time one is missing) by shape propagation."""

from __future__ import annotations

from typing import Any

from torch import fx

from bnrewrite.semantics.ops import node_shape


class ShapeLookup:
    """Shapes of graph values: recorded by the graph or by the capture's eager pass (module
    calls); shape propagation runs only the first time a shape is needed that neither has.
    Calling it gives the rank (what most decisions need)."""

    def __init__(self, cap: Any) -> None:
        self.cap = cap

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        shape = node_shape(node)
        rec = getattr(self.cap, "recording", None)
        if shape is None and rec is not None and node.op == "call_module":
            region = next((r for r in self.cap.regions if r.gm.graph is node.graph), None)
            if region is not None:
                shape = rec.out_shapes.get(
                    f"{region.path}.{node.target}" if region.path else str(node.target)
                )
        if shape is None and self.cap.example_inputs is not None:
            self.cap.ensure_shapes()
            shape = node_shape(node)
        return shape

    def __call__(self, node: fx.Node) -> int | None:
        shape = self.shape(node)
        return None if shape is None else len(shape)


def shape_lookup(cap: Any) -> ShapeLookup:
    return ShapeLookup(cap)
