"""Follow one tensor axis through reshapes, flattens, transposes and permutes.

A BatchNorm1d normalizes axis 1 of its input; a Linear acts on the last axis. A fold between
them through ``flatten``/``reshape``/``view``/``transpose``/``permute`` is exact only if the
BatchNorm's channel axis *is* the Linear's feature axis after those ops. That is decided on the
recorded shapes, op by op: a transpose or permute moves the axis; a reshape keeps it only when
an axis of the same size remains with exactly the same number of elements before and after it
(row-major order), which is what ``x.flatten(0, 1)`` or ``x.reshape(B * T, F)`` do and what a
reshape that splits or merges the axis itself does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from bnrewrite.semantics.readers import value_readers

aten = torch.ops.aten

_METHODS = {"flatten", "reshape", "view", "transpose", "permute", "contiguous", "reshape_as", "view_as", "t"}
_FUNCTIONS: dict[Any, str] = {
    torch.flatten: "flatten",
    torch.reshape: "reshape",
    torch.transpose: "transpose",
    torch.permute: "permute",
    torch.t: "t",
    aten.view.default: "reshape",
    aten.reshape.default: "reshape",
    aten._unsafe_view.default: "reshape",
    aten.flatten.using_ints: "reshape",
    aten.transpose.int: "transpose",
    aten.permute.default: "permute",
    aten.t.default: "t",
    aten.clone.default: "contiguous",
    aten.contiguous.default: "contiguous",
}

ShapeOf = Callable[[fx.Node], "tuple[int, ...] | None"]


def reshape_kind(node: fx.Node) -> str | None:
    """``reshape``/``transpose``/``permute``/``t``/``contiguous`` for an op that only moves or
    regroups elements of its first argument; None otherwise."""
    if node.op == "call_method" and node.target in _METHODS:
        kind = str(node.target)
        return {"flatten": "reshape", "view": "reshape", "reshape_as": "reshape", "view_as": "reshape"}.get(
            kind, kind
        )
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


def _norm(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def follow(node: fx.Node, axis: int, shape_of: ShapeOf) -> int | None:
    """Where ``axis`` of ``node``'s first argument ends up in ``node``'s output, or None."""
    kind = reshape_kind(node)
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if kind is None or src is None:
        return None
    before, after = shape_of(src), shape_of(node)
    if before is None or after is None or not 0 <= axis < len(before):
        return None
    if kind == "contiguous":
        return axis if tuple(before) == tuple(after) else None
    if kind == "t":
        return 1 - axis if len(before) == 2 else axis
    if kind == "transpose":
        d0, d1 = (_norm(int(d), len(before)) for d in node.args[1:3])
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if kind == "permute":
        dims = (
            node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        )
        dims = [_norm(int(d), len(before)) for d in dims]
        return dims.index(axis) if axis in dims else None
    return regrouped(before, after, axis)


def regrouped(before: Sequence[int], after: Sequence[int], axis: int) -> int | None:
    """The axis of ``after`` that holds exactly ``before``'s ``axis`` after a row-major reshape."""
    prefix, size, suffix = math.prod(before[:axis]), before[axis], math.prod(before[axis + 1 :])
    for q, n in enumerate(after):
        if n == size and math.prod(after[:q]) == prefix and math.prod(after[q + 1 :]) == suffix:
            return q
    return None


def chain_back(node: fx.Node) -> list[fx.Node]:
    """The reshape ops that lead into ``node`` (itself included), each the only reader of the
    values before it, in execution order."""
    chain: list[fx.Node] = []
    cur = node
    while reshape_kind(cur) is not None:
        chain.insert(0, cur)
        src = cur.args[0] if cur.args and isinstance(cur.args[0], fx.Node) else None
        if src is None or len(value_readers(src)) != 1:
            break
        cur = src
    return chain


def chain_forward(node: fx.Node) -> list[fx.Node]:
    """The reshape ops that follow ``node`` while each is the only reader of the one before."""
    chain: list[fx.Node] = []
    cur = node
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        if reshape_kind(user) is None or not user.args or user.args[0] is not cur:
            break
        chain.append(user)
        cur = user
    return chain


def track(chain: Sequence[fx.Node], axis: int, shape_of: ShapeOf) -> int | None:
    """Follow ``axis`` through every op of ``chain`` in order; None where it cannot be proven."""
    for node in chain:
        moved = follow(node, axis, shape_of)
        if moved is None:
            return None
        axis = moved
    return axis
