"""``--plot ranges.svg|png``: per layer, the per-channel weight ranges before and after a rewrite.

One point per output channel and layer, on a log scale: grey before (the layer as it was: unfolded
for ``analyze``/``fold``, folded for ``equalize``), blue after; channels behind a precision
finding are marked (PR001 overflow, PR002 the small channels per-tensor int8 loses, PR003
subnormal, PR005 dead). Drawn with matplotlib, an optional extra: ``pip install
'bnrewrite[plot]'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bnrewrite.errors import UsageError
from bnrewrite.files import atomic_path, check_output

FORMATS = (".svg", ".png")


def check_plot_path(path: str | os.PathLike[str], *, force: bool) -> None:
    """Fail before any work when the plot cannot be written: format, existing file, matplotlib."""
    if Path(path).suffix.lower() not in FORMATS:
        raise UsageError(f"--plot {path}: expected a .svg or .png file")
    check_output(path, force=force)
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install 'bnrewrite[plot]'") from exc


def plot_ranges(report: Any, path: str | os.PathLike[str], *, force: bool = False) -> str:
    """Draw the report's per-layer channel ranges (``report.details['precision']``) to ``path``."""
    check_plot_path(path, force=force)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report.details.get("precision") or []
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 4.8))
    marks = {
        "PR001 overflow": ("overflow_channels", "#cc0000", "x"),
        "PR002 small for int8": ("spread_channels", "#e69138", "v"),
        "PR003 subnormal": ("subnormal_channels", "#674ea7", "s"),
        "PR005 dead": ("dead_channels", "#000000", "o"),
    }  # drawn where the layer has that finding
    seen: set[str] = set()
    positive = [
        float(r[r > 0].min())
        for lay in layers
        for r in (lay.ranges, lay.before_ranges)
        if r is not None and bool((r > 0).any())
    ]
    floor = min(positive, default=1.0) / 10  # a dead channel (range 0) is drawn here
    for i, layer in enumerate(layers):
        after = layer.ranges.clamp_min(floor).tolist()
        if layer.before_ranges is not None:
            before = layer.before_ranges.clamp_min(floor).tolist()
            ax.scatter(
                [i - 0.18] * len(before), before, s=6, color="#999999", label=None if seen else "before"
            )
        ax.scatter([i + 0.18] * len(after), after, s=6, color="#1f77b4", label=None if seen else "after")
        seen.add("points")
        for name, (attr, color, marker) in marks.items():
            if name.split()[0] not in layer.codes:
                continue
            idx = [int(c) for c in getattr(layer, attr).tolist() if int(c) < len(after)]
            if idx:
                style = {"c": color} if marker == "x" else {"facecolors": "none", "edgecolors": color}
                ax.scatter(
                    [i + 0.18] * len(idx), [after[c] for c in idx], s=30, marker=marker,
                    label=None if name in seen else name, **style,
                )  # fmt: skip
                seen.add(name)
    ax.set_yscale("log")
    ax.set_xticks(range(len(layers)))
    ax.set_xticklabels([layer.layer for layer in layers], rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("largest |weight| per output channel")
    ax.set_title(f"{report.command} {report.model}: per-channel weight ranges", fontsize=10)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    if layers:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    suffix = Path(path).suffix.lower().lstrip(".")
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format=suffix, dpi=120)
    plt.close(fig)
    return str(path)
