"""Folds beyond the immediate neighbour: a BatchNorm over a channel concatenation or a sum of
layer outputs (every layer absorbs its part), or over a Linear's output moved by reshapes.

Matches: ``cat(dim=1)`` of conv/linear outputs (eval Dropout looked through), ``a + b (+ ...)``
of such outputs, a Linear followed by flatten/reshape/view/transpose/permute. Guarantees: a
decision only where the channel mapping is proven (widths, the concatenated axis, the axis
followed through every reshape on recorded shapes); otherwise the reason (FD202, BN009).
"""

from __future__ import annotations

import itertools
import operator
from typing import Any

import torch
from torch import fx, nn

from bnrewrite.plan.decision import PRECEDING, Decision, RankOf, label, out_channels, shape_of
from bnrewrite.semantics.layers import LayerSite, layer_site
from bnrewrite.semantics.norms import BNSite
from bnrewrite.semantics.ops import module_at
from bnrewrite.semantics.readers import value_readers
from bnrewrite.semantics.reshapes import chain_back, reshape_kind, track

aten = torch.ops.aten
_ADDS = (operator.add, torch.add, aten.add.Tensor, "add", "__add__")


def _passthrough(site: BNSite, node: fx.Node, eval_mode: bool) -> fx.Node:
    """Look through an eval-mode Dropout (identity) read by nothing else: a Dropout module, or
    ATen ``dropout(x, p, train=False)``."""
    if len(value_readers(node)) != 1 or not node.args or not isinstance(node.args[0], fx.Node):
        return node
    if node.op == "call_module":
        m = module_at(site.region.gm, str(node.target)) if site.region else None
        if isinstance(m, nn.modules.dropout._DropoutNd) and (not m.training or eval_mode):
            return node.args[0]
    if node.op == "call_function" and node.target is aten.dropout.default:
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        if train is False or eval_mode:
            return node.args[0]
    return node


def check_combined(
    site: BNSite, rank_of: RankOf, eval_mode: bool
) -> tuple[Decision | None, tuple[str, str] | None]:
    """BatchNorm over a channel concatenation or a sum of layer outputs, or over a Linear's
    output moved by reshapes: every layer absorbs its part. (decision, or why not)."""
    src = site.input
    if src is None or site.region is None or site.num_features is None or site.axis != 1:
        return None, None
    if len(value_readers(src)) != 1:
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
            return [], f"{label(layer)} has weights computed in the graph"
        if len(value_readers(node)) != 1:
            return [], f"output of {label(layer)} is also used elsewhere"
        layers.append(layer)
    return layers, None


def _concat(
    site: BNSite, cat: fx.Node, rank_of: RankOf, eval_mode: bool
) -> tuple[Decision | None, tuple[str, str] | None]:
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return None, None
    layers, why = _pieces(site, list(tensors), eval_mode)
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
        slices=list(itertools.pairwise(bounds)), combine="cat",
    ), None  # fmt: skip


def _sum(site: BNSite, add: fx.Node, eval_mode: bool) -> tuple[Decision | None, tuple[str, str] | None]:
    terms = _sum_terms(add)
    if terms is None:
        return None, None
    layers, why = _pieces(site, terms, eval_mode)
    if not layers:
        return None, ("BN009", f"sum {add.name}: {why}") if why else None
    if any(out_channels(la) != site.num_features for la in layers):
        return None, ("FD202", f"a term of {add.name} has other than {site.num_features} channels")
    names = ", ".join(label(la) for la in layers)
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
        nested = isinstance(arg, fx.Node) and arg.target in _ADDS and len(value_readers(arg)) == 1
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
        producers=[layer], combine="reshape",
    ), None  # fmt: skip
