"""Rule ``into-following`` (FD102; FD107 through reshapes): a BatchNorm folds into every conv,
transposed conv or Linear that reads its output (a BatchNorm after the activation).

Matches: a BatchNorm (or affine site) every value reader of which is a layer - directly, through
a copying pad (reflect/replicate/circular commute with a per-channel map), or a Linear through
reshapes that keep the channel axis as its feature axis.
Check: every reader has stored weights (FD204) and the BatchNorm's channels as its input channels
(FD202); a conv reads no zero padding (FD201: the shift would reach the border); a transposed conv
is 1x1 with stride 1 (FD206); a Linear reads the BatchNorm's channel axis (FD202).
Rewrite (plan steps): every reader gets ``W * s`` along its input channels and ``b + W t`` (the
shift summed over the kernel) and reads the BatchNorm's input; shape reads of the BatchNorm's
output move to its input (same shape).
Local check: every folded layer against the original on ``s * x + t``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from bnrewrite.plan.decision import (
    FOLLOWING,
    Decision,
    Note,
    RankOf,
    in_channels,
    label,
    shape_of,
)
from bnrewrite.semantics import ops
from bnrewrite.semantics.affine import Absorbed, Affine, Side
from bnrewrite.semantics.layers import LayerSite, layer_site
from bnrewrite.semantics.norms import BNSite
from bnrewrite.semantics.readers import move_metadata_readers, value_readers
from bnrewrite.semantics.reshapes import chain_forward, reshape_kind, track

NAME = "into-following"


def _check_following(site: BNSite, rank_of: RankOf) -> tuple[list[LayerSite], list[fx.Node], Note | None]:
    """Every reader of the BatchNorm's output is a layer (through a copying pad or reshapes)
    that can absorb it: (layers, the entry node of each, why not)."""
    users = value_readers(site.node)  # (shape reads follow the value the fold leaves)
    layers: list[LayerSite] = []
    entries: list[fx.Node] = []
    for entry in users:
        if not entry.args or entry.args[0] is not site.node or site.node in entry.args[1:]:
            return [], [], None
        user, reshaped, note = _following_layer(site, entry, rank_of)
        layer = layer_site(site.region, user) if user is not None else None
        if layer is None:
            return [], [], note
        note = _refuses_following(site, layer, reshaped, rank_of)
        if note is not None:
            return [], [], note
        layers.append(layer)
        entries.append(entry)
    return layers, entries, None


def _following_layer(
    site: BNSite, entry: fx.Node, rank_of: RankOf
) -> tuple[fx.Node | None, bool, Note | None]:
    """The node that may be the layer reading ``entry``: itself, the reader of a copying pad
    (reflect/replicate/circular commute with a per-channel affine), or the reader of a reshape
    chain that keeps the channel axis as the feature axis. (node, through reshapes, why not)."""
    if ops.is_copying_pad(entry) and len(value_readers(entry)) == 1:
        user = value_readers(entry)[0]
        return (user, False, None) if user.args and user.args[0] is entry else (None, False, None)
    if reshape_kind(entry) is None:
        return entry, False, None
    chain = [entry, *chain_forward(entry)]  # BN -> reshapes -> Linear
    end = chain[-1]
    readers = value_readers(end)
    user = readers[0] if len(readers) == 1 else end
    if user is end or not user.args or user.args[0] is not end:
        return None, False, None
    shape = shape_of(rank_of, end)
    axis = track(chain, 1, lambda n: shape_of(rank_of, n))
    if shape is None or axis != len(shape) - 1:
        why = ("FD202", "after the reshapes the BN's channel axis is not the Linear's feature axis")
        return None, False, why if layer_site(site.region, user) is not None else None
    return user, True, None


def _refuses_following(site: BNSite, layer: LayerSite, reshaped: bool, rank_of: RankOf) -> Note | None:
    """Why ``layer`` cannot absorb the BatchNorm before it, or None."""
    name = label(layer)
    if not layer.constant or layer.weight is None:
        return "FD204", f"{name} has weights computed in the graph"
    if in_channels(layer) != site.num_features:
        return "FD202", f"{name} has {in_channels(layer)} input channels, BN has {site.num_features}"
    if layer.kind == "conv" and layer.zero_pads():
        return "FD201", f"following {name} pads with zeros"
    if layer.kind == "conv_transpose" and (
        any(k != 1 for k in layer.kernel)
        or any(s != 1 for s in layer.stride)
        or (not isinstance(layer.padding, str) and any(int(p) != 0 for p in layer.padding))
    ):
        return "FD206", f"following {name} is a transposed conv with kernel/stride > 1"
    if layer.kind == "linear" and (reshaped or site.axis == -1):
        return None  # the axis was followed through the reshapes, or is the last dim
    if layer.kind != "linear":
        if site.axis == -1 and rank_of(site.node) != 2:
            return "FD202", f"{site.kind} scales the last dim; {name}'s channels are dim 1"
        return None
    rank = rank_of(site.node)
    if rank is None:
        return "FD202", f"rank of the BN output unknown, needed for {name}: pass example inputs"
    if rank != 2:
        return "FD202", f"BN output has rank {rank}; {name} acts on the last dim"
    return None


def check(site: BNSite, rank_of: RankOf, eval_mode: bool = False) -> tuple[Decision | None, Note | None]:
    """The decision to fold into every layer that reads the BatchNorm, or why not."""
    consumers, entries, note = _check_following(site, rank_of)
    if not consumers:
        return None, note
    names = ", ".join(label(c) for c in consumers)
    through = any(reshape_kind(e) is not None for e in entries)
    code = "FD107" if through else "FD102"
    return Decision(
        site,
        FOLLOWING,
        code,
        f"folds into following {names}",
        consumers=consumers,
        entries=entries,
        rule=NAME,
    ), None


def rewrite(
    folder: Any, d: Decision, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[list[Any], list[Absorbed], list[LayerSite]]:
    """Every following layer absorbs the BatchNorm and reads its input instead."""
    entries, absorbed = [], []
    for layer, entry in zip(d.consumers, d.entries):
        a = Absorbed(Side.BEFORE, Affine(scale, shift, d.site.axis))
        entries.append(folder.absorb(layer, d, a))
        entry.args = (d.site.input, *entry.args[1:])
        absorbed.append(a)
    move_metadata_readers(d.site.node, d.site.input)  # ``B, C, H, W = x.shape``: same shape
    return entries, absorbed, list(d.consumers)
