"""Decide, for one BatchNorm, whether and where it can be folded, and if not, exactly why.

`analyze` reports these decisions and `fold` carries them out, so the verdict a user reads is
the one the rewrite applies. Preference: into the preceding layer, else into every following
layer, else a per-channel scale-and-shift, else (statistics unusable) left alone.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..graph import ops
from ..graph.layers import LayerSite, layer_site
from ..graph.norms import BNSite
from ..graph.ops import node_shape
from ..graph.reshapes import chain_back, chain_forward, reshape_kind, track, value_readers
from ..select import Selector
from . import fold_cost

aten = torch.ops.aten
_ADDS = (operator.add, torch.add, aten.add.Tensor, "add", "__add__")

PRECEDING = "fold-into-preceding"
FOLLOWING = "fold-into-following"
SCALE_SHIFT = "scale-shift"
NOT_FOLDABLE = "not-foldable"


@dataclass(frozen=True)
class FoldPolicy:
    """What the user asked of a fold, handed unchanged from ``fold`` down to every decision:
    fold training-mode BNs as if in eval mode, turn unabsorbable BNs into a scale-and-shift,
    time folds that give a transposed conv a bias (FD108), and which BNs to touch at all."""

    eval_mode: bool = False
    bn_to_affine: bool = False
    speed_check: bool = True
    selector: Selector | None = None


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
    producers: list[LayerSite] = field(default_factory=list)  # concat pieces / sum terms
    slices: list[tuple[int, int]] = field(default_factory=list)  # concat: channels of each piece
    combine: str | None = None  # "cat" | "sum" | "reshape" for folds beyond the direct neighbour
    shift_into: int = 0  # sum: the term whose bias takes the shift (the others keep theirs)

    @property
    def target(self) -> str | None:
        if self.verdict == PRECEDING and self.producers:
            return ", ".join(p.module_path or p.name for p in self.producers)
        if self.verdict == PRECEDING and self.producer is not None:
            return self.producer.module_path or self.producer.name
        if self.verdict == FOLLOWING:
            return ", ".join(c.module_path or c.name for c in self.consumers)
        return None


def stats_problem(site: BNSite) -> str | None:
    """Why the stored statistics or affine parameters cannot be used, if they cannot."""
    if site.affine is not None:
        finite = all(bool(torch.isfinite(t).all()) for t in site.affine)
        return None if finite else "its evaluated scale or shift has NaN/Inf values"
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
        return None, ("FD204", f"{_label(layer)} has weights computed in the graph")
    readers = value_readers(src)
    if any(u not in own for u in readers):
        others = ", ".join(u.name for u in readers if u not in own)
        return None, ("BN009", f"output of {_label(layer)} is also used by {others}")
    if _out_channels(layer) != site.num_features:
        return None, (
            "FD202",
            f"{_label(layer)} has {_out_channels(layer)} output channels, BN has {site.num_features}",
        )
    rank = rank_of(src) if (layer.kind == "linear" or site.axis != 1) else None
    if layer.kind == "linear" and site.axis != -1:
        if rank is None:
            return None, ("FD202", f"rank of {_label(layer)}'s output unknown: pass example inputs")
        if rank != 2:
            return None, ("FD202", f"{_label(layer)} output has rank {rank}; BN normalizes dim 1")
    if layer.kind != "linear" and site.axis == -1 and rank != 2:
        return None, ("FD202", f"{site.kind} scales the last dim; {_label(layer)}'s channels are dim 1")
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
        reshaped = False
        # A reflect/replicate/circular pad commutes with the per-channel affine: look through it.
        if ops.is_copying_pad(entry) and len(entry.users) == 1:
            user = next(iter(entry.users))
            if not user.args or user.args[0] is not entry:
                return [], [], None
        elif reshape_kind(entry) is not None:  # BN -> reshapes -> Linear
            chain = [entry, *chain_forward(entry)]
            end = chain[-1]
            user = next(iter(end.users)) if len(end.users) == 1 else end
            if user is end or not user.args or user.args[0] is not end:
                return [], [], None
            shape = _shape(rank_of, end)
            axis = track(chain, 1, lambda n: _shape(rank_of, n))
            if shape is None or axis != len(shape) - 1:
                if layer_site(site.region, user) is not None:
                    return (
                        [],
                        [],
                        (
                            "FD202",
                            "after the reshapes the BN's channel axis is not the Linear's feature axis",
                        ),
                    )
                return [], [], None
            reshaped = True
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
        if layer.kind == "linear" and (reshaped or site.axis == -1):
            pass  # the axis was followed through the reshapes above, or is the last dim
        elif layer.kind != "linear" and site.axis == -1 and rank_of(site.node) != 2:
            return [], [], ("FD202", f"{site.kind} scales the last dim; {label}'s channels are dim 1")
        elif layer.kind == "linear":
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


def decide(
    site: BNSite,
    rank_of: RankOf,
    *,
    eval_mode: bool = False,
    bn_to_affine: bool = False,
    speed_check: bool = True,
) -> Decision:
    """The fold decision for one BatchNorm site. One that no neighbour can absorb stays a
    BatchNorm (a fold must never add work) unless ``bn_to_affine`` asks for a scale-and-shift.
    ``speed_check``: a fold that would give a transposed conv a bias is timed first and refused
    (FD108) where it measures slower than the BatchNorm it replaces (see ``fold_cost``)."""
    d = _decide(site, rank_of, eval_mode, bn_to_affine)
    if not speed_check or bn_to_affine or d.verdict not in (PRECEDING, FOLLOWING):
        return d
    for layer, bn_after in _new_bias_layers(d):
        if not fold_cost.gains_bias(layer):
            continue
        timing = fold_cost.time_new_bias(layer, _shape(rank_of, layer.node), bn_after=bn_after)
        if timing is not None and timing.slower:
            why = (
                f"giving {_label(layer)} a bias would make it slower here ({timing.describe()}; "
                "--no-speed-check folds it anyway)"
            )
            return Decision(site, NOT_FOLDABLE, "FD108", f"stays a BatchNorm: {why}", notes=[("FD108", why)])
    return d


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
        return Decision(site, PRECEDING, "FD101", f"folds into {_label(producer)}", producer=producer)
    if note:
        notes.append(note)
    combined, note = _check_combined(site, rank_of, eval_mode)
    if combined is not None:
        return combined
    if note:
        notes.append(note)
    consumers, entries, note = _check_following(site, rank_of)
    if consumers:
        names = ", ".join(_label(c) for c in consumers)
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


def rank_lookup(cap) -> RankOf:
    """A rank lookup (with ``.shape(node)``) that reads shapes recorded by the graph or by the
    capture's eager pass (module calls), and runs shape propagation only the first time a
    shape is needed that neither has."""

    def shape_of(node: fx.Node) -> tuple[int, ...] | None:
        shape = node_shape(node)
        rec = getattr(cap, "recording", None)
        if shape is None and rec is not None and node.op == "call_module":
            region = next((r for r in cap.regions if r.gm.graph is node.graph), None)
            if region is not None:
                shape = rec.out_shapes.get(
                    f"{region.path}.{node.target}" if region.path else str(node.target)
                )
        if shape is None and cap.example_inputs is not None:
            cap.ensure_shapes()
            shape = node_shape(node)
        return shape

    def rank_of(node: fx.Node) -> int | None:
        shape = shape_of(node)
        return None if shape is None else len(shape)

    rank_of.shape = shape_of  # type: ignore[attr-defined]
    return rank_of


def _shape(rank_of: RankOf, node: fx.Node) -> tuple[int, ...] | None:
    shape_of = getattr(rank_of, "shape", None)
    return shape_of(node) if shape_of is not None else node_shape(node)


def _passthrough(site: BNSite, node: fx.Node, eval_mode: bool) -> fx.Node:
    """Look through an eval-mode Dropout (identity) read by nothing else: a Dropout module, or
    ATen ``dropout(x, p, train=False)``."""
    if len(node.users) != 1 or not node.args or not isinstance(node.args[0], fx.Node):
        return node
    if node.op == "call_module":
        m = site.region.gm.get_submodule(str(node.target)) if site.region else None
        if isinstance(m, nn.modules.dropout._DropoutNd) and (not m.training or eval_mode):
            return node.args[0]
    if node.op == "call_function" and node.target is aten.dropout.default:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if train is False or eval_mode:
            return node.args[0]
    return node


def _check_combined(
    site: BNSite, rank_of: RankOf, eval_mode: bool
) -> tuple[Decision | None, tuple[str, str] | None]:
    """BatchNorm over a channel concatenation or a sum of layer outputs, or over a Linear's
    output moved by reshapes: every layer absorbs its part. (decision, or why not)."""
    src = site.input
    if src is None or site.region is None or site.num_features is None or site.axis != 1:
        return None, None
    if len(src.users) != 1:
        return None, None
    if src.op == "call_function" and src.target in (torch.cat, torch.concat, aten.cat.default):
        return _concat(site, src, rank_of, eval_mode)
    if src.op in ("call_function", "call_method") and src.target in _ADDS:
        return _sum(site, src, eval_mode)
    if reshape_kind(src) is not None:
        return _linear_reshaped(site, src, rank_of)
    return None, None


def _pieces(site: BNSite, nodes: list[Any], eval_mode: bool) -> tuple[list[LayerSite], str | None]:
    """The layers whose outputs are combined; ([], None) when some piece is no layer output at
    all (nothing to say: the combination is just not a fold candidate), ([], why) otherwise."""
    layers = []
    for raw in nodes:
        if not isinstance(raw, fx.Node):
            return [], None
        node = _passthrough(site, raw, eval_mode)
        layer = layer_site(site.region, node) if site.region else None
        if layer is None:
            return [], None
        if not layer.constant or layer.weight is None:
            return [], f"{_label(layer)} has weights computed in the graph"
        if len(node.users) != 1:
            return [], f"output of {_label(layer)} is also used elsewhere"
        layers.append(layer)
    return layers, None


def _concat(
    site: BNSite, cat: fx.Node, rank_of: RankOf, eval_mode: bool
) -> tuple[Decision | None, tuple[str, str] | None]:
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    rank = rank_of(cat)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return None, None
    if rank is None or (dim % rank if dim < 0 else dim) != 1:
        return None, ("FD202", f"{cat.name} concatenates along dim {dim}, BN normalizes dim 1")
    layers, why = _pieces(site, list(tensors), eval_mode)
    if not layers:
        return None, ("BN009", f"concatenation {cat.name}: {why}") if why else None
    widths = [_out_channels(la) for la in layers]
    if sum(widths) != site.num_features:
        return None, (
            "FD202",
            f"concatenation {cat.name} has {sum(widths)} channels, BN has {site.num_features}",
        )
    if any(la.kind == "linear" and rank != 2 for la in layers):
        return None, ("FD202", f"concatenation {cat.name} of Linear outputs has rank {rank}")
    bounds = [0, *itertools.accumulate(widths)]
    names = ", ".join(_label(la) for la in layers)
    return Decision(
        site, PRECEDING, "FD105", f"folds into the concatenated {names}", producers=layers,
        slices=list(itertools.pairwise(bounds)), combine="cat",
    ), None  # fmt: skip


def _sum(site: BNSite, add: fx.Node, eval_mode: bool) -> tuple[Decision | None, tuple[str, str] | None]:
    terms = _sum_terms(add)
    if terms is None:
        return None, None
    layers, why = _pieces(site, terms, eval_mode)
    if not layers:
        return None, ("BN009", f"sum {add.name}: {why}") if why else None
    if any(_out_channels(la) != site.num_features for la in layers):
        return None, ("FD202", f"a term of {add.name} has other than {site.num_features} channels")
    names = ", ".join(_label(la) for la in layers)
    return Decision(
        site, PRECEDING, "FD106", f"folds into the summed {names}", producers=layers, combine="sum",
        shift_into=_shift_term(layers),
    ), None  # fmt: skip


def _shift_term(layers: list[LayerSite]) -> int:
    """The term that takes the shift: one that has a bias already, else one where a new bias is
    cheap (not a transposed conv), else the first."""
    for wanted in (lambda la: la.bias is not None, lambda la: la.kind != "conv_transpose"):
        for i, la in enumerate(layers):
            if wanted(la):
                return i
    return 0


def _sum_terms(add: fx.Node) -> list[Any] | None:
    """The terms of ``a + b (+ c ...)``: nested two-term adds read by nothing else, no alpha."""
    if add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    terms: list[Any] = []
    for arg in add.args:
        nested = isinstance(arg, fx.Node) and arg.target in _ADDS and len(arg.users) == 1
        inner = _sum_terms(arg) if nested else None
        terms.extend(inner if inner is not None else [arg])
    return terms


def _linear_reshaped(
    site: BNSite, end: fx.Node, rank_of: RankOf
) -> tuple[Decision | None, tuple[str, str] | None]:
    chain = chain_back(end)
    start = chain[0].args[0] if chain and isinstance(chain[0].args[0], fx.Node) else None
    layer = layer_site(site.region, start) if (start is not None and site.region) else None
    if layer is None or layer.kind != "linear" or len(value_readers(start)) != 1:
        return None, None
    if not layer.constant or layer.weight is None:
        return None, ("FD204", f"{_label(layer)} has weights computed in the graph")
    out_shape = _shape(rank_of, start)
    if out_shape is None:
        return None, ("FD202", f"shapes around {_label(layer)} unknown: pass example inputs")
    axis = track(chain, len(out_shape) - 1, lambda n: _shape(rank_of, n))
    if axis != 1:
        return None, (
            "FD202",
            f"after {', '.join(n.name for n in chain)} the BN's channel axis is not {_label(layer)}'s feature axis",
        )
    if _out_channels(layer) != site.num_features:
        return None, (
            "FD202",
            f"{_label(layer)} has {_out_channels(layer)} features, BN has {site.num_features}",
        )
    return Decision(
        site, PRECEDING, "FD107", f"folds into {_label(layer)} through {', '.join(n.name for n in chain)}",
        producers=[layer], combine="reshape",
    ), None  # fmt: skip
