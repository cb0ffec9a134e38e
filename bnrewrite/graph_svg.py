"""A graph picture without Graphviz: a layered layout drawn as SVG from Python.

Graphviz is not on a fresh machine and nothing in the set-up installs it, so ``--graph x.svg``
draws the picture itself where ``dot`` is missing: nodes in layers by longest path from the
inputs (top to bottom), ordered within a layer by the mean position of their predecessors (a
few sweeps cut most crossings), boxes coloured by what the rewrite did to them (removed,
changed, added), edges as curves. The result is plain SVG 1.1 that any browser opens.
"""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape

_COLORS = {
    "removed": ("#f4cccc", "#cc0000", "5,3"),
    "changed": ("#fff2cc", "#b45f06", ""),
    "added": ("#d9ead3", "#38761d", ""),
}
_BOX_W, _BOX_H, _GAP_X, _GAP_Y, _CHAR = 170, 44, 24, 36, 6.2


def _layers(nodes: list[str], preds: dict[str, list[str]]) -> dict[str, int]:
    """Longest path from a node without predecessors (the nodes come in topological order)."""
    layer: dict[str, int] = {}
    for n in nodes:
        layer[n] = max((layer[p] + 1 for p in preds[n] if p in layer), default=0)
    return layer


def _order(rows: list[list[str]], preds: dict[str, list[str]], succs: dict[str, list[str]]) -> None:
    """Barycenter sweeps (down, up, down): each node moves towards its neighbours' mean position."""
    for sweep in range(3):
        down = sweep % 2 == 0
        seq = rows[1:] if down else rows[-2::-1]
        for row in seq:
            pos = {n: i for r in rows for i, n in enumerate(r)}
            near = preds if down else succs

            def key(n: str, near: dict[str, list[str]] = near, pos: dict[str, int] = pos) -> float:
                around = [pos[m] for m in near[n] if m in pos]
                return sum(around) / len(around) if around else pos[n]

            row.sort(key=key)


def _text(s: str, width: int) -> str:
    limit = int((width - 10) / _CHAR)
    return s if len(s) <= limit else s[: max(limit - 1, 1)] + "…"


def render(
    view: Any,
    *,
    status: dict[str, str] | None = None,
    edge_status: dict[tuple[str, str], str] | None = None,
    title: str = "bnrewrite",
) -> str:
    """SVG text of ``view`` (a networkx DiGraph as ``graph_files.graph_view`` builds it)."""
    keep = [n for n, a in view.nodes(data=True) if a.get("op") != "get_attr"]
    kept = set(keep)
    preds = {n: [p for p in view.predecessors(n) if p in kept] for n in keep}
    succs = {n: [s for s in view.successors(n) if s in kept] for n in keep}
    layer = _layers(keep, preds)
    rows: list[list[str]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for n in keep:
        rows[layer[n]].append(n)
    _order(rows, preds, succs)
    widest = max((len(r) for r in rows), default=1)
    width = widest * (_BOX_W + _GAP_X) + _GAP_X
    height = len(rows) * (_BOX_H + _GAP_Y) + _GAP_Y + 24
    xy: dict[str, tuple[float, float]] = {}
    for i, row in enumerate(rows):
        offset = (width - len(row) * (_BOX_W + _GAP_X) + _GAP_X) / 2
        for j, n in enumerate(row):
            xy[n] = (offset + j * (_BOX_W + _GAP_X), 24 + _GAP_Y + i * (_BOX_H + _GAP_Y))
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
        '<rect width="100%" height="100%" fill="#ffffff"/>',
        f'<text x="{_GAP_X}" y="20" font-size="14" font-weight="bold">{escape(title)}</text>',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
    ]
    out.extend(_edges(view, xy, edge_status or {}))
    out.extend(_boxes(view, keep, xy, status or {}))
    out.append("</svg>")
    return "\n".join(out)


def _edges(
    view: Any, xy: dict[str, tuple[float, float]], edge_status: dict[tuple[str, str], str]
) -> list[str]:
    """One curve per edge between drawn boxes: red dashes where removed, green where added."""
    out: list[str] = []
    for u, v in view.edges():
        if u not in xy or v not in xy:
            continue
        (x1, y1), (x2, y2) = xy[u], xy[v]
        x1, y1, x2, y2 = x1 + _BOX_W / 2, y1 + _BOX_H, x2 + _BOX_W / 2, y2
        st = edge_status.get((u, v), "")
        color = {"removed": "#cc0000", "added": "#38761d"}.get(st, "#555")
        dash = ' stroke-dasharray="5,3"' if st == "removed" else ""
        bend = max((y2 - y1) / 2, 12)
        out.append(
            f'<path d="M {x1:.1f} {y1:.1f} C {x1:.1f} {y1 + bend:.1f}, {x2:.1f} {y2 - bend:.1f}, {x2:.1f} {y2:.1f}" '
            f'fill="none" stroke="{color}" stroke-width="{2 if st == "added" else 1.2}"{dash} marker-end="url(#arrow)"/>'
        )
    return out


def _boxes(
    view: Any, keep: list[str], xy: dict[str, tuple[float, float]], status: dict[str, str]
) -> list[str]:
    """One box per node: its module path (or name) and what it computes, coloured by status."""
    out: list[str] = []
    for n in keep:
        a = view.nodes[n]
        x, y = xy[n]
        fill, stroke, dash = _COLORS.get(status.get(n, ""), ("#ffffff", "#444444", ""))
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        label = str(a.get("module_path") or n)
        kind = str(a.get("module_type") or a.get("target") or a.get("op") or "")
        shape = a.get("shape")
        out.append(
            f"<g><title>{escape(label)} ({escape(kind)}){' ' + escape(str(shape)) if shape else ''}</title>"
        )
        out.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{_BOX_W}" height="{_BOX_H}" rx="6" fill="{fill}" '
            f'stroke="{stroke}"{dashes}/>'
        )
        out.append(f'<text x="{x + 6:.1f}" y="{y + 16:.1f}">{escape(_text(label, _BOX_W))}</text>')
        sub = kind + (f" {shape}" if shape else "")
        out.append(
            f'<text x="{x + 6:.1f}" y="{y + 32:.1f}" fill="#555">{escape(_text(sub, _BOX_W))}</text></g>'
        )
    return out
