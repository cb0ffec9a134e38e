"""Rule ``into-preceding`` (FD101; FD107 through reshapes): a BatchNorm folds into the conv,
transposed conv or Linear whose output it normalizes.

Matches: a BatchNorm (or affine site) whose input - through no-op casts, or for a Linear through
flatten/reshape/view/transpose/permute - is that layer's output.
Check: the layer's weights are stored (FD204), nothing else reads its output (BN009), its output
channels are the BatchNorm's (FD202), and for a Linear the BatchNorm's channel axis is the
Linear's feature axis (rank 2, the last dim, or followed through the reshapes on recorded shapes:
FD202 otherwise).
Rewrite (plan steps): the layer's weight and bias become ``s * W``, ``s * b + t`` (computed in
float64 after the graph work); the BatchNorm's readers read the layer.
Local check: the folded layer against the original layer followed by the BatchNorm's map
(``LayerCheck``), and the module in the BatchNorm's place against the original BatchNorm
(``SlotCheck``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from bnrewrite.plan.combined import combined_source
from bnrewrite.plan.decision import (
    PRECEDING,
    Decision,
    Note,
    RankOf,
    label,
    out_channels,
    shape_of,
)
from bnrewrite.semantics import ops
from bnrewrite.semantics.affine import Absorbed, Affine, Side
from bnrewrite.semantics.layers import LayerSite, layer_site
from bnrewrite.semantics.norms import BNSite
from bnrewrite.semantics.readers import value_readers
from bnrewrite.semantics.reshapes import chain_back, reshape_kind, track

NAME = "into-preceding"


def _through_casts(site: BNSite) -> tuple[fx.Node | None, set[fx.Node]]:
    """The BatchNorm's input before any no-op dtype casts that only lead to it (a subclass that
    normalizes ``x.float()``), and the nodes that may read it: the BatchNorm or the first cast."""
    src, own = site.input, set(site.nodes)
    while src is not None and ops.is_noop_cast(src) and set(value_readers(src)) <= own:
        own = {src}
        src = src.args[0]
    return src, own


def _check_preceding(site: BNSite, rank_of: RankOf) -> tuple[LayerSite | None, tuple[str, str] | None]:
    src, own = _through_casts(site)
    if src is None:
        return None, None
    layer = layer_site(site.region, src)
    if layer is None:
        return None, None
    if not layer.constant or layer.weight is None:
        return None, ("FD204", f"{label(layer)} has weights computed in the graph")
    readers = value_readers(src)
    if any(u not in own for u in readers):
        others = ", ".join(u.name for u in readers if u not in own)
        return None, ("BN009", f"output of {label(layer)} is also used by {others}")
    if out_channels(layer) != site.num_features:
        return None, (
            "FD202",
            f"{label(layer)} has {out_channels(layer)} output channels, BN has {site.num_features}",
        )
    rank = rank_of(src) if (layer.kind == "linear" or site.axis != 1) else None
    if layer.kind == "linear" and site.axis != -1:
        if rank is None:
            return None, ("FD202", f"rank of {label(layer)}'s output unknown: pass example inputs")
        if rank != 2:
            return None, ("FD202", f"{label(layer)} output has rank {rank}; BN normalizes dim 1")
    if layer.kind != "linear" and site.axis == -1 and rank != 2:
        return None, ("FD202", f"{site.kind} scales the last dim; {label(layer)}'s channels are dim 1")
    return layer, None


def check(site: BNSite, rank_of: RankOf, eval_mode: bool = False) -> tuple[Decision | None, Note | None]:
    """The decision to fold into the layer right before the BatchNorm, or why not."""
    producer, note = _check_preceding(site, rank_of)
    if producer is None:
        return None, note
    return Decision(
        site, PRECEDING, "FD101", f"folds into {label(producer)}", producer=producer, rule=NAME
    ), None


def check_reshaped(
    site: BNSite, rank_of: RankOf, eval_mode: bool = False
) -> tuple[Decision | None, Note | None]:
    """The decision to fold into a Linear whose output reaches the BatchNorm through reshapes."""
    src = combined_source(site)
    if src is None or reshape_kind(src) is None:
        return None, None
    return _linear_reshaped(site, src, rank_of)


def _linear_reshaped(
    site: BNSite, end: fx.Node, rank_of: RankOf
) -> tuple[Decision | None, tuple[str, str] | None]:
    chain = chain_back(end)
    start = chain[0].args[0] if chain and isinstance(chain[0].args[0], fx.Node) else None
    layer = layer_site(site.region, start) if (start is not None and site.region) else None
    if layer is None or layer.kind != "linear" or len(value_readers(start)) != 1:
        return None, None
    if not layer.constant or layer.weight is None:
        return None, ("FD204", f"{label(layer)} has weights computed in the graph")
    out_shape = shape_of(rank_of, start)
    if out_shape is None:
        return None, ("FD202", f"shapes around {label(layer)} unknown: pass example inputs")
    axis = track(chain, len(out_shape) - 1, lambda n: shape_of(rank_of, n))
    if axis != 1:
        return None, (
            "FD202",
            f"after {', '.join(n.name for n in chain)} the BN's channel axis is not {label(layer)}'s feature axis",
        )
    if out_channels(layer) != site.num_features:
        return None, (
            "FD202",
            f"{label(layer)} has {out_channels(layer)} features, BN has {site.num_features}",
        )
    return Decision(
        site, PRECEDING, "FD107", f"folds into {label(layer)} through {', '.join(n.name for n in chain)}",
        producers=[layer], combine="reshape", rule=NAME,
    ), None  # fmt: skip


def rewrite(
    folder: Any, d: Decision, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[list[Any], list[Absorbed], list[LayerSite]]:
    """The layer absorbs the whole map; the BatchNorm's readers read the layer's output."""
    layer = d.producers[0] if d.producers else d.producer
    assert layer is not None
    absorbed = Absorbed(Side.AFTER, Affine(scale, shift, d.site.axis))
    entry = folder.absorb(layer, d, absorbed)
    folder.bypass(d)
    return [entry], [absorbed], [layer]
