"""Decide, for one BatchNorm, whether and where it can be folded, and if not, exactly why.

`analyze` reports these decisions and `fold` carries them out, so the verdict a user reads is
the one the rewrite applies. Preference: into the preceding layer, else into every following
layer, else a per-channel scale-and-shift, else (statistics unusable) left alone.
"""

from __future__ import annotations

import torch
from torch import fx

from bnrewrite.plan import fold_cost
from bnrewrite.plan.combined import check_combined
from bnrewrite.plan.decision import (
    FOLLOWING,
    NOT_FOLDABLE,
    PRECEDING,
    SCALE_SHIFT,
    Decision,
    FoldPolicy,
    RankOf,
    in_channels,
    label,
    out_channels,
    shape_of,
    stats_problem,
)
from bnrewrite.semantics import fold_math, ops
from bnrewrite.semantics.layers import LayerSite, layer_site
from bnrewrite.semantics.norms import BNSite
from bnrewrite.semantics.readers import value_readers
from bnrewrite.semantics.reshapes import chain_forward, reshape_kind, track


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


Note = tuple[str, str]  # (code, message)


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


def decide(site: BNSite, rank_of: RankOf, policy: FoldPolicy | None = None) -> Decision:
    """The fold decision for one BatchNorm site under the user's ``policy``. One that no
    neighbour can absorb stays a BatchNorm (a fold must never add work) unless the policy asks
    for a scale-and-shift (``bn_to_affine``). With ``speed_check``, a fold that would give a
    transposed conv a bias is timed first and refused (FD108) where it measures slower than the
    BatchNorm it replaces (see ``fold_cost``)."""
    policy = policy or FoldPolicy()
    eval_mode, bn_to_affine, speed_check = policy.eval_mode, policy.bn_to_affine, policy.speed_check
    d = _decide(site, rank_of, eval_mode, bn_to_affine)
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


def _decide(site: BNSite, rank_of: RankOf, eval_mode: bool, bn_to_affine: bool) -> Decision:
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
        return Decision(site, PRECEDING, "FD101", f"folds into {label(producer)}", producer=producer)
    if note:
        notes.append(note)
    combined, note = check_combined(site, rank_of, eval_mode)
    if combined is not None:
        return combined
    if note:
        notes.append(note)
    consumers, entries, note = _check_following(site, rank_of)
    if consumers:
        names = ", ".join(label(c) for c in consumers)
        through = any(reshape_kind(e) is not None for e in entries)
        return Decision(
            site,
            FOLLOWING,
            "FD107" if through else "FD102",
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
    if site.is_affine_layer:  # an affine layer no neighbour absorbs: already one op, it stays
        return Decision(site, NOT_FOLDABLE, notes[0][0], f"stays as it is: {reason}", notes=notes)
    if bn_to_affine:
        return Decision(site, SCALE_SHIFT, notes[0][0], f"becomes scale-and-shift: {reason}", notes=notes)
    return Decision(
        site,
        NOT_FOLDABLE,
        notes[0][0],
        f"stays a BatchNorm (one fused op in eval mode; --bn-to-affine makes it a scale-and-shift): {reason}",
        notes=notes,
    )
