"""What a fold decision is: the verdicts, the user's fold policy, one BatchNorm's decision as
data, and the shape lookup every decision reads (recorded shapes first, propagation only when
one is missing)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import fx
from torch.utils.weak import WeakIdKeyDictionary

from bnrewrite.select import Selector
from bnrewrite.semantics.layers import LayerSite
from bnrewrite.semantics.norms import BNSite
from bnrewrite.semantics.ops import node_shape
from bnrewrite.semantics.shapes import ShapeLookup


class Verdict(str, Enum):
    """Where a BatchNorm goes. A ``str``: reports and JSON carry the value as it is."""

    PRECEDING = "fold-into-preceding"
    FOLLOWING = "fold-into-following"
    SCALE_SHIFT = "scale-shift"
    NOT_FOLDABLE = "not-foldable"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


PRECEDING, FOLLOWING = Verdict.PRECEDING, Verdict.FOLLOWING
SCALE_SHIFT, NOT_FOLDABLE = Verdict.SCALE_SHIFT, Verdict.NOT_FOLDABLE


@dataclass(frozen=True)
class FoldPolicy:
    """What the user asked of a fold, handed unchanged from ``fold`` down to every decision:
    fold training-mode BNs as if in eval mode, turn unabsorbable BNs into a scale-and-shift,
    time folds that give a transposed conv a bias (FD108), which BNs to touch at all, and
    whether parallel linear branches merge into one conv (FD109)."""

    eval_mode: bool = False
    bn_to_affine: bool = False
    speed_check: bool = True
    selector: Selector | None = None
    merge_branches: bool = True
    target_dtype: Any = None  # torch.float16 / torch.bfloat16: no fold that overflows it (FD111)
    norm_affine: bool = False  # fold LayerNorm/RMSNorm/GroupNorm/InstanceNorm affines (FD112)


@dataclass
class Decision:
    site: BNSite
    verdict: Verdict
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
    rule: str = ""  # the rewrite rule that carries it out (``rewrite_rules.bn_rules.RULES``)

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
    """Why the stored statistics or affine parameters cannot be used, if they cannot.

    A plan asks this of every BatchNorm several times (each pass to a fixed point): the answer
    is kept per tensor, for as long as those same tensors hold the same values (their version
    counters); the tensors are only weakly referenced by the key."""
    tensors = (
        site.affine
        if site.affine is not None
        else (site.running_var, site.running_mean, site.weight, site.bias)
    )
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not present:
        return None
    key, others = present[0], tuple(present[1:])
    stamp = tuple(t._version for t in present)
    hit = _STATS.get(key)
    same = hit is not None and hit[1] == stamp and len(hit[0]) == len(others)
    if hit is not None and same and all(a is b for a, b in zip(hit[0], others)):
        return hit[2]
    problem = _stats_problem(site)
    _STATS[key] = (others, stamp, problem)
    return problem


_STATS: Any = WeakIdKeyDictionary()  # tensor -> (the other tensors, versions, answer)


def _stats_problem(site: BNSite) -> str | None:
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


def out_channels(layer: LayerSite) -> int:
    assert layer.weight is not None
    if layer.kind == "conv_transpose":
        return int(layer.weight.shape[1]) * layer.groups
    return int(layer.weight.shape[0])


def in_channels(layer: LayerSite) -> int:
    assert layer.weight is not None
    if layer.kind == "conv_transpose":
        return int(layer.weight.shape[0])
    if layer.kind == "linear":
        return int(layer.weight.shape[1])
    return int(layer.weight.shape[1]) * layer.groups


Note = tuple[str, str]  # (code, message): why a rule refused
RankOf = Callable[[fx.Node], "int | None"]  # a ShapeLookup, or any rank function (tests)


def label(layer: LayerSite) -> str:
    return layer.module_path or layer.name


def shape_of(rank_of: RankOf, node: fx.Node) -> tuple[int, ...] | None:
    """The node's shape through a lookup that knows shapes, else as the graph recorded it."""
    return rank_of.shape(node) if isinstance(rank_of, ShapeLookup) else node_shape(node)
