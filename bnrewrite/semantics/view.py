"""A networkx view of a captured graph, for rules to query and for graph export.

It is rebuilt from the fx graphs on every call, so it cannot drift from them. Node ids are fx
node names (prefixed with the region path for partially traced models); attributes are plain
JSON values. ``view.graph['fx']`` maps each id to its (region, fx node) for rules that need the
tensors; graph exporters drop it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx

from bnrewrite.semantics.ops import module_at, node_shape, source_line, target_name

if TYPE_CHECKING:
    import networkx as nx

    from bnrewrite.semantics.captured import Capture


def node_attributes(region, node: fx.Node) -> dict[str, object]:
    module_type = None
    if node.op == "call_module":
        module_type = type(module_at(region.gm, str(node.target))).__name__
    shape = node_shape(node)
    dtype = None
    meta = node.meta.get("tensor_meta") or node.meta.get("val")
    if meta is not None and hasattr(meta, "dtype"):
        dtype = str(meta.dtype).replace("torch.", "")
    return {
        "op": node.op,
        "target": target_name(node),
        "module_path": region.module_path(node) if node.op not in ("placeholder", "output") else None,
        "module_type": module_type,
        "shape": list(shape) if shape is not None else None,
        "dtype": dtype,
        "source": source_line(node),
        "region": region.path,
        "rewrite": (node.meta.get("bnrewrite") or {}).get("rule"),
    }


def to_networkx(cap: Capture) -> nx.DiGraph:
    """Build the DiGraph view of every captured region."""
    import networkx as nx  # here, not at import: it costs ~0.2 s and most runs need no view

    g = nx.DiGraph()
    fx_nodes: dict[str, tuple[object, fx.Node]] = {}
    for region in cap.regions:
        for node in region.gm.graph.nodes:
            nid = region.qualify(node.name)
            g.add_node(nid, **node_attributes(region, node))
            fx_nodes[nid] = (region, node)
            for inp in node.all_input_nodes:
                g.add_edge(region.qualify(inp.name), nid)
    g.graph["fx"] = fx_nodes
    return g


def tensor_predecessors(view: nx.DiGraph, nid: str) -> list[str]:
    """Predecessors that carry activations (not stored weights)."""
    return [p for p in view.predecessors(nid) if view.nodes[p]["op"] != "get_attr"]
