"""Rule ``into-sum`` (FD106): a BatchNorm over a sum of layer outputs folds into every term: the
scale into each, the shift into one bias.

Matches: ``a + b (+ ...)`` (nested two-term adds, no alpha) of conv / transposed conv / Linear
outputs (eval Dropout looked through) read by nothing else, under a BatchNorm.
Check: every term is a layer output with stored weights read only by the sum (BN009), each with
the BatchNorm's channels (FD202).
Rewrite (plan steps): every term gets ``s * W``, ``s * b``; one term (one with a bias already,
else one where a new bias is cheap) also gets ``+ t``; the BatchNorm's readers read the sum.
Local check: every folded layer against the original followed by the scale (and the shift for
the one term).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from bnrewrite.plan.combined import ADDS, combined_source, pieces, shift_term, sum_terms
from bnrewrite.plan.decision import (
    PRECEDING,
    Decision,
    Note,
    RankOf,
    label,
    out_channels,
)
from bnrewrite.semantics.affine import Absorbed, Affine, Side
from bnrewrite.semantics.layers import LayerSite
from bnrewrite.semantics.norms import BNSite

NAME = "into-sum"


def check(site: BNSite, rank_of: RankOf, eval_mode: bool = False) -> tuple[Decision | None, Note | None]:
    """The decision to fold into every summed layer, or why not."""
    src = combined_source(site)
    if src is None:
        return None, None
    if src.op in ("call_function", "call_method") and src.target in ADDS:
        return _sum(site, src, eval_mode)
    return None, None


def _sum(site: BNSite, add: fx.Node, eval_mode: bool) -> tuple[Decision | None, tuple[str, str] | None]:
    terms = sum_terms(add)
    if terms is None:
        return None, None
    layers, why = pieces(site, terms, eval_mode)
    if not layers:
        return None, ("BN009", f"sum {add.name}: {why}") if why else None
    if any(out_channels(la) != site.num_features for la in layers):
        return None, ("FD202", f"a term of {add.name} has other than {site.num_features} channels")
    names = ", ".join(label(la) for la in layers)
    return Decision(
        site, PRECEDING, "FD106", f"folds into the summed {names}", producers=layers, combine="sum",
        shift_into=shift_term(layers), rule=NAME,
    ), None  # fmt: skip


def rewrite(
    folder: Any, d: Decision, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[list[Any], list[Absorbed], list[LayerSite]]:
    """The scale into every term, the shift into one; the BatchNorm's readers read the sum."""
    entries, absorbed = [], []
    for i, layer in enumerate(d.producers):
        a = Absorbed(Side.AFTER, Affine(scale, shift if i == d.shift_into else None, d.site.axis))
        entries.append(folder.absorb(layer, d, a))
        absorbed.append(a)
    folder.bypass(d)
    return entries, absorbed, list(d.producers)
