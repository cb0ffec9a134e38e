"""Decide, for one BatchNorm, whether and where it can be folded, and if not, exactly why.

`analyze` reports these decisions and `fold` carries them out, so the verdict a user reads is
the one the rewrite applies. Preference: into the preceding layer, else into every following
layer, else a per-channel scale-and-shift, else (statistics unusable) left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import fx

from ..graph import ops
from ..graph.capture import node_rank
from ..graph.norms import BNSite, LayerSite, layer_site

PRECEDING = "fold-into-preceding"
FOLLOWING = "fold-into-following"
SCALE_SHIFT = "scale-shift"
NOT_FOLDABLE = "not-foldable"


@dataclass
class Decision:
    site: BNSite
    verdict: str
    code: str
    reason: str
    producer: LayerSite | None = None
    consumers: list[LayerSite] = field(default_factory=list)
    entries: list[fx.Node] = field(default_factory=list)  # nodes whose input becomes the BN input
    notes: list[tuple[str, str]] = field(default_factory=list)

    @property
    def target(self) -> str | None:
        if self.verdict == PRECEDING and self.producer is not None:
            return self.producer.module_path or self.producer.name
        if self.verdict == FOLLOWING:
            return ", ".join(c.module_path or c.name for c in self.consumers)
        return None


def stats_problem(site: BNSite) -> str | None:
    """Why the stored statistics or affine parameters cannot be used, if they cannot."""
    var, mean = site.running_var, site.running_mean
    if var is not None and not bool(torch.isfinite(var).all()):
        return "running_var has NaN/Inf values"
    if var is not None and bool((var < 0).any()):
        return "running_var has negative values"
    for name, t in (("running_mean", mean), ("weight", site.weight), ("bias", site.bias)):
        if t is not None and not bool(torch.isfinite(t).all()):
            return f"{name} has NaN/Inf values"
    return None


def _out_channels(layer: LayerSite) -> int:
    assert layer.weight is not None
    if layer.kind == "conv_transpose":
        return int(layer.weight.shape[1]) * layer.groups
    return int(layer.weight.shape[0])


def _in_channels(layer: LayerSite) -> int:
    assert layer.weight is not None
    if layer.kind == "conv_transpose":
        return int(layer.weight.shape[0])
    if layer.kind == "linear":
        return int(layer.weight.shape[1])
    return int(layer.weight.shape[1]) * layer.groups


RankOf = Callable[[fx.Node], "int | None"]


def _label(layer: LayerSite) -> str:
    return layer.module_path or layer.name


def _check_preceding(site: BNSite, rank_of: RankOf) -> tuple[LayerSite | None, tuple[str, str] | None]:
    src = site.input
    if src is None:
        return None, None
    layer = layer_site(site.region, src)
    if layer is None:
        return None, None
    if not layer.constant or layer.weight is None:
        return None, ("FD204", f"{_label(layer)} has weights computed in the graph")
    own = site.nodes
    if any(u not in own for u in src.users):
        others = ", ".join(u.name for u in src.users if u not in own)
        return None, ("BN009", f"output of {_label(layer)} is also used by {others}")
    if _out_channels(layer) != site.num_features:
        return None, (
            "FD202",
            f"{_label(layer)} has {_out_channels(layer)} output channels, BN has {site.num_features}",
        )
    if layer.kind == "linear":
        rank = rank_of(src)
        if rank is None:
            return None, ("FD202", f"rank of {_label(layer)}'s output unknown: pass example inputs")
        if rank != 2:
            return None, ("FD202", f"{_label(layer)} output has rank {rank}; BN normalizes dim 1")
    return layer, None


def _check_following(
    site: BNSite, rank_of: RankOf
) -> tuple[list[LayerSite], list[fx.Node], tuple[str, str] | None]:
    users = list(site.node.users)
    if not users:
        return [], [], None
    layers: list[LayerSite] = []
    entries: list[fx.Node] = []
    for entry in users:
        if not entry.args or entry.args[0] is not site.node or site.node in entry.args[1:]:
            return [], [], None
        user = entry
        # A reflect/replicate/circular pad commutes with the per-channel affine: look through it.
        if ops.is_copying_pad(entry) and len(entry.users) == 1:
            user = next(iter(entry.users))
            if not user.args or user.args[0] is not entry:
                return [], [], None
        layer = layer_site(site.region, user)
        if layer is None:
            return [], [], None
        label = _label(layer)
        if not layer.constant or layer.weight is None:
            return [], [], ("FD204", f"{label} has weights computed in the graph")
        if _in_channels(layer) != site.num_features:
            return (
                [],
                [],
                (
                    "FD202",
                    f"{label} has {_in_channels(layer)} input channels, BN has {site.num_features}",
                ),
            )
        if layer.kind == "conv" and layer.zero_pads():
            return [], [], ("FD201", f"following {label} pads with zeros")
        if layer.kind == "conv_transpose" and (
            any(k != 1 for k in layer.kernel)
            or any(s != 1 for s in layer.stride)
            or (not isinstance(layer.padding, str) and any(int(p) != 0 for p in layer.padding))
        ):
            return [], [], ("FD206", f"following {label} is a transposed conv with kernel/stride > 1")
        if layer.kind == "linear":
            rank = rank_of(site.node)
            if rank is None:
                return (
                    [],
                    [],
                    (
                        "FD202",
                        f"rank of the BN output unknown, needed for {label}: pass example inputs",
                    ),
                )
            if rank != 2:
                return [], [], ("FD202", f"BN output has rank {rank}; {label} acts on the last dim")
        layers.append(layer)
        entries.append(entry)
    return layers, entries, None


def decide(site: BNSite, rank_of: RankOf, *, eval_mode: bool = False) -> Decision:
    """The fold decision for one BatchNorm site."""
    if not site.constant:
        return Decision(
            site, NOT_FOLDABLE, "FD204", "statistics or affine parameters are computed in the graph"
        )
    if not site.tracks_stats:
        return Decision(
            site, NOT_FOLDABLE, "BN005", "track_running_stats=False: normalizes with batch statistics"
        )
    if site.training and not eval_mode:
        return Decision(site, NOT_FOLDABLE, "BN002", "in training mode (call model.eval() or pass --eval)")
    problem = stats_problem(site)
    if problem:
        return Decision(site, NOT_FOLDABLE, "BN004", problem)
    notes: list[tuple[str, str]] = []
    producer, note = _check_preceding(site, rank_of)
    if producer is not None:
        return Decision(site, PRECEDING, "FD101", f"folds into {_label(producer)}", producer=producer)
    if note:
        notes.append(note)
    consumers, entries, note = _check_following(site, rank_of)
    if consumers:
        names = ", ".join(_label(c) for c in consumers)
        return Decision(
            site,
            FOLLOWING,
            "FD102",
            f"folds into following {names}",
            consumers=consumers,
            entries=entries,
            notes=notes,
        )
    if note:
        notes.append(note)
    if not notes:
        notes.append(("FD206", "no conv/linear directly before or after it"))
    reason = "; ".join(f"{msg} ({code})" for code, msg in notes)
    return Decision(site, SCALE_SHIFT, notes[0][0], f"becomes scale-and-shift: {reason}", notes=notes)


def rank_lookup(cap) -> RankOf:
    """A rank lookup that runs shape propagation only the first time a rank is needed."""

    def rank_of(node: fx.Node) -> int | None:
        rank = node_rank(node)
        if rank is None and cap.example_inputs is not None:
            cap.ensure_shapes()
            rank = node_rank(node)
        return rank

    return rank_of
