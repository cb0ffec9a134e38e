"""What the concat and sum rules share: the layers whose outputs a concatenation or a sum
combines (eval Dropout looked through; each read by nothing else), the terms of a nested sum,
and the term that takes a sum's shift."""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx, nn

from bnrewrite.plan.decision import label
from bnrewrite.semantics.layers import LayerSite, layer_site
from bnrewrite.semantics.norms import BNSite
from bnrewrite.semantics.ops import module_at
from bnrewrite.semantics.readers import value_readers

aten = torch.ops.aten
ADDS = (operator.add, torch.add, aten.add.Tensor, "add", "__add__")


def combined_source(site: BNSite) -> fx.Node | None:
    """The BatchNorm's input when a fold beyond its direct neighbour may start there: a channel
    BatchNorm (dim 1) with known width whose input nothing else reads; None otherwise."""
    src = site.input
    if src is None or site.region is None or site.num_features is None or site.axis != 1:
        return None
    return src if len(value_readers(src)) == 1 else None


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


def pieces(site: BNSite, nodes: list[Any], eval_mode: bool) -> tuple[list[LayerSite], str | None]:
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


def shift_term(layers: list[LayerSite]) -> int:
    """The term that takes the shift: one that has a bias already, else one where a new bias is
    cheap (not a transposed conv), else the first."""
    for wanted in (lambda la: la.bias is not None, lambda la: la.kind != "conv_transpose"):
        for i, la in enumerate(layers):
            if wanted(la):
                return i
    return 0


def sum_terms(add: fx.Node) -> list[Any] | None:
    """The terms of ``a + b (+ c ...)``: nested two-term adds read by nothing else, no alpha."""
    if add.kwargs.get("alpha", 1) != 1 or len(add.args) != 2:
        return None
    terms: list[Any] = []
    for arg in add.args:
        nested = isinstance(arg, fx.Node) and arg.target in ADDS and len(value_readers(arg)) == 1
        inner = sum_terms(arg) if nested else None
        terms.extend(inner if inner is not None else [arg])
    return terms
