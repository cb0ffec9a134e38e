"""Who reads a value: the one definition every pass shares (fold, concat and sum folds, branch
sets, affine sites, reshape chains, the fix rules).

An op that only reads a tensor's metadata - its shape (``x.shape``, ``x.size()``, ``x.ndim``,
``x.dim()``, ``x.numel()``), dtype, device, layout or contiguity, or builds a new tensor of the
same shape (``zeros_like``, ``x.new_zeros``), or reshapes another tensor like it
(``y.reshape_as(x)``) - is not a reader of its values: asserts and comparisons built from such
reads (``assert x.ndim == 4``, ``B, C, H, W = x.shape``) do not stop a fold that changes the
values but keeps the shape. Both dialects: fx ``getattr``/method calls and torch functions, and
export's ``sym_size``/``sym_numel``/``sym_stride`` (whose ``_assert_scalar`` and
``sym_constrain_range`` users read those numbers, never the tensor).

Guarantees: ``value_readers(node)`` lists every user that may read the values; a pass that
replaces ``node`` by another value of the same shape, dtype and device may move the others
(``move_metadata_readers``) and stays exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

aten = torch.ops.aten

_META_ATTRS = frozenset(
    {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "is_sparse", "is_quantized", "is_meta"}
)
_META_METHODS = frozenset(
    {"size", "dim", "numel", "nelement", "ndimension", "stride", "is_contiguous", "is_floating_point",
     "is_complex", "get_device", "element_size", "new_zeros", "new_ones", "new_empty", "new_full"}
)  # fmt: skip
_META_FUNCTIONS = frozenset(
    {
        torch.numel, torch.is_tensor, torch.is_floating_point, torch.is_complex, torch.zeros_like,
        torch.ones_like, torch.empty_like, torch.full_like, len, torch.Tensor.size, torch.Tensor.dim,
        aten.sym_size.int, aten.sym_size.default, aten.sym_numel.default, aten.sym_stride.int,
        aten.sym_stride.default, aten.sym_storage_offset.default, aten._assert_tensor_metadata.default,
        aten.dim.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
        aten.full_like.default, aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default,
        aten.new_full.default, aten.is_contiguous.default,
    }
)  # fmt: skip
# Tensor methods and torch functions, by name, that read no values: the eager recording pass
# counts consumers of a module's output by these names (see capture/recording.py).
METADATA_NAMES = _META_METHODS | {"zeros_like", "ones_like", "empty_like", "full_like", "numel", "is_tensor"}
# These read the shape of their second argument only: ``y.reshape_as(x)`` reads x's shape.
SHAPE_OF_SECOND_METHODS = frozenset({"reshape_as", "view_as", "expand_as"})
_SHAPE_OF_SECOND = frozenset({aten.reshape_as.default, aten.view_as.default, aten.expand_as.default})


def reads_metadata_only(user: fx.Node, node: fx.Node) -> bool:
    """True when ``user`` reads only ``node``'s metadata (shape, dtype, device...), not its values."""
    if user.op == "call_method":
        if user.target in _META_METHODS:
            return user.args[:1] == (node,) and node not in user.args[1:] and node not in user.kwargs.values()
        if user.target in SHAPE_OF_SECOND_METHODS:
            return user.args[0] is not node and node not in user.kwargs.values()
        return False
    if user.op != "call_function":
        return False
    if user.target in _SHAPE_OF_SECOND:
        return user.args[0] is not node and node not in user.kwargs.values()
    if user.target is getattr:  # fx records ``x.shape`` as a call of the builtin
        return user.args[1:2] in [(m,) for m in _META_ATTRS]
    return user.target in _META_FUNCTIONS


def value_readers(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that may read its values (every other user reads metadata only)."""
    return [u for u in node.users if not reads_metadata_only(u, node)]


def metadata_readers(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read only its metadata."""
    return [u for u in node.users if reads_metadata_only(u, node)]


def move_metadata_readers(node: fx.Node, to: fx.Node) -> None:
    """Let ``node``'s metadata-only readers read ``to`` (a value of the same shape, dtype and
    device that stays in the graph), so ``node`` can be erased once nothing reads its values.
    ``to`` must come before every reader: each one is moved after it where it does not."""
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    for user in metadata_readers(node):
        user.replace_input_with(node, to)
        if order.get(user, 0) < order.get(to, 0):
            _move_after(user, to, order)


def _move_after(user: fx.Node, anchor: fx.Node, order: dict[fx.Node, int]) -> None:
    """Put ``user`` and everything that depends on it (up to the anchor's position) after the anchor."""
    todo = [user]
    seen: list[fx.Node] = []
    while todo:
        n = todo.pop()
        if n in seen or n.op == "output":
            continue
        seen.append(n)
        todo.extend(u for u in n.users if order.get(u, 0) < order.get(anchor, 0))
    cursor = anchor
    for n in sorted(seen, key=order.__getitem__):
        cursor.append(n)
        cursor = n


_CASTS = frozenset({"to", "type_as", "float", "half", "bfloat16", "contiguous"})


def readers_through_casts(node: fx.Node) -> list[fx.Node]:
    """The value readers of ``node``, looking through dtype casts (``.to(dtype)``): a cast of a
    float32 value to float32 changes nothing, and in a lower dtype only the rounding moves."""
    readers = []
    for u in value_readers(node):
        if u.op == "call_method" and u.target in _CASTS and u.args[0] is node:
            readers.extend(readers_through_casts(u))
        else:
            readers.append(u)
    return readers


def is_cast_of(arg: Any, node: fx.Node) -> bool:
    """True when ``arg`` is ``node`` through one or more dtype casts."""
    while isinstance(arg, fx.Node) and arg.op == "call_method" and arg.target in _CASTS:
        if arg.args[0] is node:
            return True
        arg = arg.args[0]
    return False
