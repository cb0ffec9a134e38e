"""The user's policy over a rule's fold decision: no fold that overflows the target dtype
(FD111), and no fold that gives a transposed conv a bias that measures slower here (FD108).

The rules decide where a BatchNorm can go (``rewrite_rules.bn_rules``); `analyze` reports those
decisions with the policy applied and `fold` carries them out, so the verdict a user reads is
the one the rewrite applies.
"""

from __future__ import annotations

import torch

from bnrewrite.plan import fold_cost
from bnrewrite.plan.decision import (
    FOLLOWING,
    NOT_FOLDABLE,
    PRECEDING,
    Decision,
    FoldPolicy,
    RankOf,
    label,
    shape_of,
)
from bnrewrite.semantics import fold_math
from bnrewrite.semantics.layers import LayerSite


def apply_policy(d: Decision, rank_of: RankOf, policy: FoldPolicy) -> Decision:
    """A rule's decision under the user's policy: no fold that overflows the target dtype
    (FD111); with ``speed_check``, a fold that would give a transposed conv a bias is timed first
    and refused (FD108) where it measures slower than the BatchNorm it replaces (``fold_cost``)."""
    site = d.site
    bn_to_affine, speed_check = policy.bn_to_affine, policy.speed_check
    if policy.target_dtype is not None and d.verdict in (PRECEDING, FOLLOWING):
        why = _overflows(d, policy.target_dtype)
        if why:
            return Decision(site, NOT_FOLDABLE, "FD111", f"stays a BatchNorm: {why}", notes=[("FD111", why)])
    if not speed_check or bn_to_affine or d.verdict not in (PRECEDING, FOLLOWING):
        return d
    for layer, bn_after in _new_bias_layers(d):
        if not fold_cost.gains_bias(layer):
            continue
        timing = fold_cost.time_new_bias(layer, shape_of(rank_of, layer.node), bn_after=bn_after)
        if timing is not None and timing.slower:
            why = (
                f"giving {label(layer)} a bias would make it slower here ({timing.describe()}; "
                "--no-speed-check folds it anyway)"
            )
            return Decision(site, NOT_FOLDABLE, "FD108", f"stays a BatchNorm: {why}", notes=[("FD108", why)])
    return d


def _overflows(d: Decision, dtype: torch.dtype) -> str | None:
    """Why the folded weights would not fit ``dtype`` (values beyond its largest), or None."""
    limit = float(torch.finfo(dtype).max)
    scale, shift = d.site.eval_affine()
    pieces: list[tuple[LayerSite, torch.Tensor, torch.Tensor | None]] = []
    if d.verdict == FOLLOWING:
        pieces = [(c, scale, shift) for c in d.consumers]
    else:
        for i, p in enumerate(d.producers or [d.producer]):
            if p is None:
                continue
            s, t = scale, shift
            if d.combine == "cat":
                lo, hi = d.slices[i]
                s, t = scale[lo:hi], shift[lo:hi]
            elif d.combine == "sum" and i != d.shift_into:
                t = None
            pieces.append((p, s, t))
    for layer, s, t in pieces:
        if layer.weight is None:
            continue
        fold = fold_math.into_following if d.verdict == FOLLOWING else fold_math.into_preceding
        w, b = fold(layer.kind, layer.weight, layer.bias, layer.groups, s, t if t is not None else shift * 0)
        if d.verdict != FOLLOWING and t is None:
            b = None
        worst = max(float(w.abs().max()), float(b.abs().max()) if b is not None and b.numel() else 0.0)
        if worst > limit:
            name = str(dtype).replace("torch.", "")
            return f"folding into {label(layer)} gives values up to {worst:.3g}, beyond {name}'s {limit:.6g}"
    return None


def _new_bias_layers(d: Decision) -> list[tuple[LayerSite, bool]]:
    """The layers whose bias the fold writes, each with whether the BatchNorm follows it."""
    if d.verdict == FOLLOWING:
        return [(c, False) for c in d.consumers]
    if d.combine == "sum":
        return [(d.producers[d.shift_into], True)]
    return [(p, True) for p in (d.producers or [d.producer]) if p is not None]
