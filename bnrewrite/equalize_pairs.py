"""Which layers cross-layer equalization may rescale together: a layer and every layer its output
reaches through positive-homogeneous ops only (ReLU, max/avg pooling, padding with zeros,
reshapes, concatenation), found on the captured graph; and why a pair is refused (EQ201)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from bnrewrite.semantics.captured import Region
from bnrewrite.semantics.layers import LayerSite, layer_site
from bnrewrite.semantics.ops import module_at
from bnrewrite.semantics.readers import value_readers

_HOMOGENEOUS_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.dropout._DropoutNd,
)  # fmt: skip

_HOMOGENEOUS_FUNCTIONS = {
    torch.relu, torch.nn.functional.relu, torch.nn.functional.leaky_relu, torch.nn.functional.max_pool1d,
    torch.nn.functional.max_pool2d, torch.nn.functional.max_pool3d, torch.nn.functional.avg_pool1d,
    torch.nn.functional.avg_pool2d, torch.nn.functional.avg_pool3d, torch.nn.functional.adaptive_avg_pool1d,
    torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.adaptive_avg_pool3d,
    torch.nn.functional.adaptive_max_pool2d, torch.nn.functional.dropout,
    torch.ops.aten.relu.default, torch.ops.aten.relu_.default, torch.ops.aten.leaky_relu.default,
    torch.ops.aten.leaky_relu_.default, torch.ops.aten.max_pool2d.default, torch.ops.aten.avg_pool2d.default,
    torch.ops.aten.adaptive_avg_pool2d.default, torch.ops.aten.dropout.default, torch.ops.aten.clone.default,
    torch.ops.aten.prelu.default, torch.ops.aten._prelu_kernel.default,
    torch.ops.aten.max_pool2d_with_indices.default, torch.ops.aten.adaptive_max_pool2d.default,
    torch.ops.aten.upsample_nearest2d.vec, torch.ops.aten.upsample_nearest2d.default,
    torch.ops.aten.avg_pool1d.default, torch.ops.aten.max_pool1d.default, torch.ops.aten.avg_pool3d.default,
}  # fmt: skip

_HOMOGENEOUS_METHODS = {"relu", "relu_", "contiguous", "clone"}

_NOT_HOMOGENEOUS = {  # name -> why scaling its input does not scale its output
    "ReLU6": "ReLU6 clips at 6: a scaled input clips elsewhere",
    "Hardtanh": "Hardtanh clips: a scaled input clips elsewhere",
    "SiLU": "SiLU(x) = x * sigmoid(x) is not positive-homogeneous",
    "Hardswish": "hard-swish is not positive-homogeneous",
    "GELU": "GELU is not positive-homogeneous",
    "Sigmoid": "sigmoid is not positive-homogeneous",
    "Tanh": "tanh is not positive-homogeneous",
    "Mish": "Mish is not positive-homogeneous",
    "ELU": "ELU is not positive-homogeneous",
    "SELU": "SELU is not positive-homogeneous",
    "Softplus": "softplus is not positive-homogeneous",
    "hardtanh": "Hardtanh/ReLU6 clips: a scaled input clips elsewhere",
    "silu": "SiLU(x) = x * sigmoid(x) is not positive-homogeneous",
    "hardswish": "hard-swish is not positive-homogeneous",
    "gelu": "GELU is not positive-homogeneous",
    "sigmoid": "sigmoid is not positive-homogeneous",
    "tanh": "tanh is not positive-homogeneous",
    "relu6": "ReLU6 clips at 6: a scaled input clips elsewhere",
}

_CAT = {torch.cat, torch.concat, torch.ops.aten.cat.default}


@dataclass
class Pair:
    """Two layers whose shared channels can be rescaled: ``first``'s output channels
    ``[0, n)`` are ``second``'s input channels ``[offset, offset + n)``."""

    first: LayerSite
    second: LayerSite
    offset: int
    between: list[str]
    scales: torch.Tensor | None = None
    flattened: bool = False  # a flatten between: the second layer must read the channels themselves

    @property
    def label(self) -> str:
        return f"{self.first.module_path} -> {self.second.module_path}"


@dataclass
class Refused:
    first: str
    second: str | None
    reason: str


def channels_of(site: LayerSite) -> int:
    w = site.weight
    assert w is not None
    return int(w.shape[1] * site.groups) if site.kind == "conv_transpose" else int(w.shape[0])


def _step(region: Region, node: fx.Node) -> tuple[str | None, str | None]:
    """(what the op is, why not) for a reader of a channel value: ``("pass", None)`` for a
    positive-homogeneous op, ``(None, reason)`` for one that is not, ``(None, None)`` otherwise."""
    if node.op == "call_module":
        m = module_at(region.gm, str(node.target))
        if isinstance(m, nn.Upsample) and m.mode == "nearest":
            return "pass", None
        if isinstance(m, nn.Flatten):
            return "flatten", None
        if isinstance(m, _HOMOGENEOUS_MODULES) and not isinstance(m, (nn.ReLU6, nn.Hardtanh)):
            return "pass", None
        reason = _NOT_HOMOGENEOUS.get(type(m).__name__)
        return None, reason
    if node.op == "call_function":
        if node.target in _HOMOGENEOUS_FUNCTIONS:
            return "pass", None
        if node.target in _CAT:
            return "cat", None
        if node.target in (torch.flatten, torch.ops.aten.flatten.using_ints, torch.ops.aten.view.default):
            return "flatten", None
        if node.target in (torch.mean, torch.ops.aten.mean.dim):
            return "mean", None
        if node.target is torch.nn.functional.interpolate and node.kwargs.get("mode", "nearest") == "nearest":
            return "pass", None
        if node.target is operator.getitem:
            return "getitem", None
        name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
        return None, _NOT_HOMOGENEOUS.get(name)
    if node.op == "call_method":
        if node.target in _HOMOGENEOUS_METHODS:
            return "pass", None
        if node.target in ("flatten", "view", "reshape"):
            return "flatten", None
        if node.target == "mean":
            return "mean", None
        return None, _NOT_HOMOGENEOUS.get(str(node.target))
    return None, None


def _mean_keeps_channels(node: fx.Node) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return bool(dims) and all(isinstance(d, int) and (d >= 2 or d <= -1) for d in dims) and 1 not in dims


def _walk(region: Region, first: LayerSite) -> tuple[list[Pair], Refused | None]:
    """Follow ``first``'s output through positive-homogeneous ops to the layers that read it:
    one pair per reading layer (a value read by several, e.g. the branches of an Inception block,
    gives several pairs that share one scale), or none when any path ends elsewhere."""
    found: list[Pair] = []
    todo = [(first.node, 0, [], False)]
    while todo:
        cur, offset, between, flattened = todo.pop()
        if len(found) + len(todo) > 32:
            return [], None
        for nxt in value_readers(cur):
            step, why = _follow(region, first, cur, nxt, offset, between, flattened)
            if why is not None:
                return [], why
            if step is None:
                return [], None  # some reader is neither a layer nor positive-homogeneous
            if isinstance(step, Pair):
                found.append(step)
            else:
                todo.append(step)
    return found, None


def _follow(
    region: Region,
    first: LayerSite,
    cur: fx.Node,
    nxt: fx.Node,
    offset: int,
    between: list[str],
    flattened: bool,
) -> tuple[Any, Refused | None]:
    """One step from ``cur`` to its reader ``nxt``: the pair it ends in, the state to go on
    from, (None, why) for an op that is not positive-homogeneous, or (None, None)."""
    second = layer_site(region, nxt)
    if second is not None:
        if not nxt.args or nxt.args[0] is not cur or second.weight is None or not second.constant:
            return None, None
        fan = second.weight.shape[0] if second.kind == "conv_transpose" else (
            second.weight.shape[1] * (second.groups if second.kind == "conv" else 1)
        )  # fmt: skip
        if offset + channels_of(first) > fan or second.module is None:
            return None, None
        return Pair(first, second, offset, list(between), flattened=flattened), None
    kind, why = _step(region, nxt)
    if kind is None:
        where = region.module_path(nxt) or nxt.name
        return None, (Refused(first.module_path or first.name, None, f"{why} ({where})") if why else None)
    if kind == "cat":
        pieces = nxt.args[0] if nxt.args else []
        dim = nxt.args[1] if len(nxt.args) > 1 else nxt.kwargs.get("dim", 0)
        if dim != 1 or not isinstance(pieces, (list, tuple)) or sum(p is cur for p in pieces) != 1:
            return None, None
        for p in pieces:
            if p is cur:
                break
            site = layer_site(region, p) if isinstance(p, fx.Node) else None
            if site is None or site.weight is None:
                return None, None  # the slice of a piece we cannot count
            offset += channels_of(site)
    elif (kind == "mean" and not _mean_keeps_channels(nxt)) or (kind == "getitem" and nxt.args[1] != 0):
        return None, None
    elif kind == "flatten":
        flattened = True  # checked at the second layer: its fan-in must be the channels themselves
    if kind != "cat" and (not nxt.args or nxt.args[0] is not cur or cur in nxt.args[1:]):
        return None, None
    return (nxt, offset, [*between, region.module_path(nxt) or nxt.name], flattened), None


def find_pairs(region: Region) -> tuple[list[Pair], list[Refused]]:
    """Every equalizable pair of ``region`` and every pair an op between rules out."""
    pairs, refused = [], []
    for node in region.gm.graph.nodes:
        first = layer_site(region, node)
        if first is None or first.weight is None or not first.constant or first.module is None:
            continue
        found, why = _walk(region, first)
        pairs.extend(found)
        if why is not None:
            refused.append(why)
    return pairs, refused


def flatten_ok(pair: Pair) -> bool:
    """A flatten between keeps one value per channel only when the second layer reads exactly
    the first one's channels (a global pool before it), not channels times positions."""
    if not pair.flattened:
        return True
    weight = pair.second.weight
    assert weight is not None
    return (
        pair.second.kind == "linear" and pair.offset == 0 and int(weight.shape[1]) == channels_of(pair.first)
    )
