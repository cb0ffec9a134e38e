"""Rule ``into-concat`` (FD105): a BatchNorm over a channel concatenation of layer outputs folds
into every layer, each absorbing its slice of the scale and shift.

Matches: ``cat(dim=1)`` of conv / transposed conv / Linear outputs (eval Dropout looked through)
read by nothing else, under a BatchNorm.
Check: every piece is a layer output with stored weights read only by the concatenation (BN009),
the concatenated axis is the channel axis and the widths add up to the BatchNorm's (FD202).
Rewrite (plan steps): layer ``i`` gets ``s[lo:hi] * W``, ``s[lo:hi] * b + t[lo:hi]``; the
BatchNorm's readers read the concatenation.
Local check: every folded layer against the original followed by its slice of the map.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import fx

from bnrewrite.plan.combined import combined_source, pieces
from bnrewrite.plan.decision import (
    PRECEDING,
    Decision,
    Note,
    RankOf,
    label,
    out_channels,
)
from bnrewrite.semantics import ops
from bnrewrite.semantics.affine import Absorbed, Affine, Side
from bnrewrite.semantics.layers import LayerSite
from bnrewrite.semantics.norms import BNSite

NAME = "into-concat"


def check(site: BNSite, rank_of: RankOf, eval_mode: bool = False) -> tuple[Decision | None, Note | None]:
    """The decision to fold into every concatenated layer, or why not."""
    src = combined_source(site)
    if src is None:
        return None, None
    if src.op == "call_function" and src.target in (torch.cat, torch.concat, ops.aten.cat.default):
        return _concat(site, src, rank_of, eval_mode)
    return None, None


def _concat(
    site: BNSite, cat: fx.Node, rank_of: RankOf, eval_mode: bool
) -> tuple[Decision | None, tuple[str, str] | None]:
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return None, None
    layers, why = pieces(site, list(tensors), eval_mode)
    if not layers:
        return None, ("BN009", f"concatenation {cat.name}: {why}") if why else None
    # The pieces' rank is the concatenation's: a layer's output shape is recorded by the eager
    # pass, so no shape propagation runs just for this.
    rank = rank_of(layers[0].node)
    if rank is None or (dim % rank if dim < 0 else dim) != 1:
        return None, ("FD202", f"{cat.name} concatenates along dim {dim}, BN normalizes dim 1")
    widths = [out_channels(la) for la in layers]
    if sum(widths) != site.num_features:
        return None, (
            "FD202",
            f"concatenation {cat.name} has {sum(widths)} channels, BN has {site.num_features}",
        )
    if any(la.kind == "linear" and rank != 2 for la in layers):
        return None, ("FD202", f"concatenation {cat.name} of Linear outputs has rank {rank}")
    bounds = [0, *itertools.accumulate(widths)]
    names = ", ".join(label(la) for la in layers)
    return Decision(
        site, PRECEDING, "FD105", f"folds into the concatenated {names}", producers=layers,
        slices=list(itertools.pairwise(bounds)), combine="cat", rule=NAME,
    ), None  # fmt: skip


def rewrite(
    folder: Any, d: Decision, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[list[Any], list[Absorbed], list[LayerSite]]:
    """Each piece absorbs its channels; the BatchNorm's readers read the concatenation."""
    entries, absorbed = [], []
    for layer, (lo, hi) in zip(d.producers, d.slices):
        a = Absorbed(Side.AFTER, Affine(scale[lo:hi], shift[lo:hi], d.site.axis))
        entries.append(folder.absorb(layer, d, a))
        absorbed.append(a)
    folder.bypass(d)
    return entries, absorbed, list(d.producers)
