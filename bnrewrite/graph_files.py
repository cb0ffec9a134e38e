"""The graph as a file: ``.json`` (node-link), ``.graphml``, ``.dot`` or ``.svg``, and the
before/after picture of a fold (``fold --graph``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bnrewrite.capture.capture_model import capture
from bnrewrite.errors import BnrewriteError, UsageError
from bnrewrite.files import atomic_path, check_output, format_of
from bnrewrite.semantics.view import to_networkx

if TYPE_CHECKING:
    import networkx as nx


def graph_view(model: Any) -> nx.DiGraph:
    cap = capture(model, record_sources=False)
    if not cap.regions:
        raise BnrewriteError("no part of the model could be traced, so there is no graph to write")
    view = to_networkx(cap)
    view.graph.pop("fx", None)
    return view


def _plain(view: nx.DiGraph) -> nx.DiGraph:
    """GraphML wants scalar attributes: lists become strings, None becomes ''."""
    import networkx as nx

    g = nx.DiGraph()
    for n, attrs in view.nodes(data=True):
        g.add_node(
            n, **{k: ("" if v is None else str(v) if isinstance(v, list) else v) for k, v in attrs.items()}
        )
    g.add_edges_from(view.edges())
    return g


def to_dot(
    view: nx.DiGraph,
    *,
    status: dict[str, str] | None = None,
    edge_status: dict[tuple[str, str], str] | None = None,
    title: str = "bnrewrite",
) -> str:
    """DOT text; ``status``/``edge_status`` mark nodes and edges removed/changed/added."""
    colors = {
        "removed": ("#f4cccc", "#cc0000", "dashed"),
        "changed": ("#fff2cc", "#b45f06", "bold"),
        "added": ("#d9ead3", "#38761d", "bold"),
    }

    def q(s: str) -> str:
        return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'

    out = [
        f"digraph {q(title)} {{",
        "  rankdir=TB;",
        '  node [shape=box, fontsize=10, style="rounded,filled", fillcolor="#ffffff"];',
    ]
    for n, a in view.nodes(data=True):
        if a.get("op") in ("get_attr",):
            continue
        label = a.get("module_path") or n
        kind = a.get("module_type") or a.get("target") or a.get("op")
        text = f"{label}\\n{kind}"
        if a.get("shape"):
            text += f"\\n{a['shape']}"
        attrs = f"label={q(text).replace(chr(92) * 2 + 'n', chr(92) + 'n')}"
        st = (status or {}).get(n)
        if st in colors:
            fill, color, style = colors[st]
            attrs += f', fillcolor="{fill}", color="{color}", style="rounded,filled,{style}"'
        out.append(f"  {q(n)} [{attrs}];")
    edge_style = {"removed": ' [color="#cc0000", style=dashed]', "added": ' [color="#38761d", penwidth=2]'}
    for u, v in view.edges():
        if view.nodes[u].get("op") == "get_attr" or view.nodes[v].get("op") == "get_attr":
            continue
        out.append(f"  {q(u)} -> {q(v)}{edge_style.get((edge_status or {}).get((u, v), ''), '')};")
    if status:
        out.append('  subgraph cluster_legend { label="legend"; fontsize=10; style=dashed;')
        for name in ("removed", "changed", "added"):
            fill, color, style = colors[name]
            out.append(
                f'    "legend_{name}" [label="{name}", fillcolor="{fill}", color="{color}", style="rounded,filled,{style}"];'
            )
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def diff_view(
    before: nx.DiGraph, after: nx.DiGraph, changed: Iterable[str] = ()
) -> tuple[nx.DiGraph, dict[str, str], dict[tuple[str, str], str]]:
    """The union of two views with each node and edge marked removed, changed or added.

    A node is changed when its graph says a rewrite made it, or when it calls a module whose
    path is in ``changed`` (a fold's targets: the result is a module tree, traced afresh)."""
    import networkx as nx  # imported where a view is built: it costs ~0.2 s at start-up

    changed = set(changed)
    union = nx.DiGraph()
    status: dict[str, str] = {}
    for n, a in before.nodes(data=True):
        union.add_node(n, **a)
        if n not in after:
            status[n] = "removed"
    for n, a in after.nodes(data=True):
        if n not in before:
            status[n] = "added"
        elif a.get("rewrite") or (a.get("op") == "call_module" and a.get("module_path") in changed):
            status[n] = "changed"
        union.add_node(n, **a)
    union.add_edges_from(before.edges())
    union.add_edges_from(after.edges())
    edges = {e: "removed" for e in before.edges() if not after.has_edge(*e)}
    edges.update({e: "added" for e in after.edges() if not before.has_edge(*e)})
    return union, status, edges


def _title(dot_text: str) -> str:
    first = dot_text.split("\n", 1)[0]
    return first.removeprefix("digraph ").rstrip(" {").strip('"') or "bnrewrite"


def render_svg(dot_text: str) -> bytes | None:
    """SVG bytes from Graphviz's ``dot`` when it is installed, else None."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    try:
        res = subprocess.run(
            [exe, "-Tsvg"], input=dot_text.encode(), capture_output=True, timeout=120, check=True
        )
    except (subprocess.SubprocessError, OSError):
        return None
    return res.stdout


def write_dot_and_svg(
    dot_text: str,
    path: str | os.PathLike[str],
    *,
    force: bool,
    view: Any = None,
    status: dict[str, str] | None = None,
    edge_status: dict[tuple[str, str], str] | None = None,
) -> dict[str, Any]:
    """Write ``.dot`` (always) and, for a ``.svg`` path, the picture: Graphviz's where ``dot`` is
    installed, else the layered layout of :mod:`bnrewrite.graph_svg` drawn from ``view``."""
    p = Path(path)
    dot_path = p.with_suffix(".dot")
    info: dict[str, Any] = {"dot": str(dot_path)}
    if p.suffix.lower() == ".svg":
        check_output(p, force=force)
    with atomic_path(dot_path, force=force) as tmp:
        tmp.write_text(dot_text)
    if p.suffix.lower() == ".svg":
        svg = render_svg(dot_text)
        info["renderer"] = "graphviz"
        if svg is None and view is not None:
            from bnrewrite.graph_svg import render

            svg = render(view, status=status, edge_status=edge_status, title=_title(dot_text)).encode()
            info["renderer"] = "bnrewrite (Graphviz not found)"
        if svg is None:
            info["svg"] = None
            info["note"] = "Graphviz 'dot' not found: wrote the .dot only"
        else:
            with atomic_path(p, force=force) as tmp:
                tmp.write_bytes(svg)
            info["svg"] = str(p)
    return info


def write_graph(
    model: Any, path: str | os.PathLike[str], *, fmt: str | None = None, force: bool = False
) -> dict[str, Any]:
    import networkx as nx

    kind = format_of(path, fmt)
    view = graph_view(model)
    if kind == "json":
        import json

        with atomic_path(path, force=force) as tmp:
            tmp.write_text(json.dumps(nx.node_link_data(view, edges="edges"), indent=1))
    elif kind == "graphml":
        with atomic_path(path, force=force) as tmp:
            nx.write_graphml(_plain(view), tmp)
    elif kind in ("dot", "svg"):
        return write_dot_and_svg(to_dot(view), path, force=force, view=view)
    else:
        raise UsageError(f"{path}: {kind} is not a graph format")
    return {"format": kind, "path": str(path)}
