"""What a node computes when it is part of a linear branch: sums, differences, scalings by
stored constants, and the single-input affine ops a branch is made of (conv, BatchNorm and
other per-channel affine sites, average pooling, constant padding, identities), in both
dialects.

Every recognizer returns data (:class:`BranchOp`, :class:`Combination`) or None; none of them
changes the graph. Constants are evaluated from the stored tensors they read, so a kernel that
the forward computes (``self.weight + self.id_tensor``) counts as stored.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from bnrewrite.semantics import ops
from bnrewrite.semantics.layers import layer_site
from bnrewrite.semantics.norms import bn_site, fetch_attr, is_norm_module
from bnrewrite.semantics.readers import value_readers

if TYPE_CHECKING:
    from bnrewrite.semantics.captured import Region

aten = torch.ops.aten

_ADD = {operator.add, operator.iadd, torch.add, aten.add.Tensor}
_SUB = {operator.sub, operator.isub, torch.sub, aten.sub.Tensor}
_MUL = {operator.mul, operator.imul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}
_DIV = {operator.truediv, torch.div, aten.div.Tensor, aten.div.Scalar}
_NEG = {operator.neg, torch.neg, aten.neg.default}
_METHODS = {"add": "add", "sub": "sub", "mul": "mul", "div": "div", "neg": "neg"}
# In-place forms (``out += branch(x)`` as exported): linear when nothing else reads the operand
# they overwrite, so the write is invisible.
_INPLACE = {
    aten.add_.Tensor: "add",
    aten.sub_.Tensor: "sub",
    aten.mul_.Tensor: "mul",
    aten.div_.Tensor: "div",
}
_INPLACE_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}
_IDENTITY_FUNCS = {torch.clone, aten.clone.default, aten.alias.default, aten.contiguous.default}
_AVG_POOLS: dict[Any, int] = {
    torch.avg_pool1d: 1,
    F.avg_pool1d: 1,
    F.avg_pool2d: 2,
    F.avg_pool3d: 3,
    aten.avg_pool1d.default: 1,
    aten.avg_pool2d.default: 2,
    aten.avg_pool3d.default: 3,
}
_POOL_ARGS = (
    "input",
    "kernel_size",
    "stride",
    "padding",
    "ceil_mode",
    "count_include_pad",
    "divisor_override",
)
_PADS = {F.pad: ("input", "pad", "mode", "value"), aten.pad.default: ("input", "pad", "mode", "value")}
_PADS[aten.constant_pad_nd.default] = ("input", "pad", "value")


@dataclass
class Combination:
    """A node that combines values linearly: ``kind`` add/sub (``alpha`` scales the second),
    mul/div by a ``constant``, neg, or an identity."""

    kind: str
    operands: list[Any]
    alpha: float = 1.0
    constant: Any = None  # a number or a float64 tensor (mul/div)


@dataclass
class BranchOp:
    """One single-input op of a branch, with what the merge math needs."""

    kind: str  # affine | conv | conv_transpose | pool | pad | identity | nonlinear
    node: fx.Node
    input: fx.Node
    data: dict[str, Any] = field(default_factory=dict)
    nodes: list[fx.Node] = field(default_factory=list)  # every node the op is made of
    problem: str | None = None  # why this op is not linear here (training BN, ceil_mode, ...)


def constant_value(gm: fx.GraphModule, value: Any, limit: int = 64) -> Any:
    """The value of ``value`` when it is computed from stored tensors and literals alone (a
    kernel the forward computes, ``pad_values`` from a BatchNorm's buffers), else None."""
    memo: dict[fx.Node, Any] = {}

    def ev(v: Any) -> Any:
        if isinstance(v, fx.Node):
            if v not in memo:
                if len(memo) > limit:
                    raise LookupError
                memo[v] = _eval_node(gm, v, ev)
            return memo[v]
        if isinstance(v, (list, tuple)):
            return type(v)(ev(x) for x in v)
        if isinstance(v, dict):
            return {k: ev(x) for k, x in v.items()}
        return v

    try:
        with torch.no_grad():
            out = ev(value)
    except Exception:
        return None
    return out.detach() if isinstance(out, torch.Tensor) else out


def _eval_node(gm: fx.GraphModule, n: fx.Node, ev: Any) -> Any:
    if n.op == "get_attr":
        return fetch_attr(gm, str(n.target))
    if n.op == "call_function":
        return n.target(*ev(n.args), **ev(n.kwargs))
    if n.op == "call_method":
        self_, *rest = ev(n.args)
        return getattr(self_, str(n.target))(*rest, **ev(n.kwargs))
    raise LookupError(n.name)


def _number_or_constant(gm: fx.GraphModule, v: Any) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, fx.Node) and ops.reads_only_stored(v):
        c = constant_value(gm, v)
        if isinstance(c, torch.Tensor) and c.is_floating_point():
            return c.double()
    return None


def combination(gm: fx.GraphModule, node: fx.Node) -> Combination | None:
    """How ``node`` combines its inputs linearly, if it does."""
    kind = None
    if node.op == "call_function":
        t = node.target
        kind = next(
            (k for k, s in (("add", _ADD), ("sub", _SUB), ("mul", _MUL), ("div", _DIV)) if t in s), None
        )
        if t in _NEG:
            kind = "neg"
        if _hashable(t) and t in _INPLACE and _overwrites_alone(node):
            kind = _INPLACE[t]
        if t in _IDENTITY_FUNCS or t in ops.DROPOUT_TARGETS:
            return _identity_call(node)
    elif node.op == "call_method":
        kind = _METHODS.get(str(node.target))
        if node.target in _INPLACE_METHODS and _overwrites_alone(node):
            kind = _INPLACE_METHODS[str(node.target)]
        if node.target in ("contiguous", "clone"):
            return Combination("identity", [node.args[0]])
    elif node.op == "call_module":
        m = ops.module_at(gm, str(node.target))
        if isinstance(m, nn.Identity) or (isinstance(m, nn.modules.dropout._DropoutNd) and not m.training):
            return Combination("identity", [node.args[0]]) if node.args else None
    if kind is None or not node.args:
        return None
    if kind == "neg":
        return Combination("neg", [node.args[0]])
    if len(node.args) < 2 or set(node.kwargs) - {"alpha"}:
        return None
    a, b = node.args[0], node.args[1]
    if kind in ("add", "sub"):
        alpha = node.kwargs.get("alpha", 1)
        return Combination(kind, [a, b], alpha=float(alpha)) if isinstance(alpha, (int, float)) else None
    for const, other in ((b, a), (a, b)) if kind == "mul" else ((b, a),):
        c = _number_or_constant(gm, const)
        if c is not None and isinstance(other, fx.Node) and not ops.reads_only_stored(other):
            return Combination(kind, [other], constant=c)
    return None


def _overwrites_alone(node: fx.Node) -> bool:
    first = node.args[0] if node.args else None
    return isinstance(first, fx.Node) and len(value_readers(first)) == 1


def _identity_call(node: fx.Node) -> Combination | None:
    if node.target in ops.DROPOUT_TARGETS:
        a = ops.bind(node, ("input", "p", "training", "inplace"))
        if node.target is aten.dropout.default:
            a = ops.bind(node, ("input", "p", "train"))
            a["training"] = a.get("train", True)
        if a.get("training", True) is not False:
            return None
    return Combination("identity", [node.args[0]]) if node.args else None


def branch_op(region: Region, node: fx.Node, eval_mode: bool = False) -> BranchOp | None:
    """The single-input affine op ``node`` applies (``problem`` says why it is not linear here),
    a ``nonlinear`` op with one activation input, or None for anything else."""
    gm = region.gm
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    module = ops.module_at(gm, str(node.target)) if node.op == "call_module" else None
    layer = layer_site(region, node) if module is None or isinstance(module, _LAYERS) else None
    if layer is not None:
        return _conv_op(gm, layer)
    site = bn_site(region, node) if module is None or is_norm_module(module) or _stored(module) else None
    if site is not None and site.input is not None:
        return _affine_op(site, node, eval_mode)
    pool = _pool_op(gm, node)
    if pool is not None:
        return pool
    pad = _pad_op(gm, node)
    if pad is not None:
        return pad
    comb = combination(gm, node)
    if comb is not None and comb.kind == "identity" and isinstance(comb.operands[0], fx.Node):
        return BranchOp("identity", node, comb.operands[0], nodes=[node])
    inputs = [a for a in node.all_input_nodes if not ops.reads_only_stored(a) and a.op != "get_attr"]
    if len(inputs) == 1 and comb is None:
        return BranchOp("nonlinear", node, inputs[0], nodes=[node], problem=ops.target_name(node))
    return None


_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def _stored(module: nn.Module) -> bool:
    """A module with tensors of its own (a frozen BN or an affine layer may be one)."""
    return bool(module._parameters or module._buffers)


def _conv_op(gm: fx.GraphModule, layer: Any) -> BranchOp | None:
    node = layer.node
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node) or layer.kind == "linear":
        return None
    weight, bias = layer.weight, layer.bias
    if not layer.constant:  # a kernel the forward computes from stored tensors
        a = ops.bind(node, layer.arg_names)
        weight = constant_value(gm, a.get("weight"))
        bias = constant_value(gm, a.get("bias")) if a.get("bias") is not None else None
    op = BranchOp(layer.kind, node, src, nodes=[node])
    if not isinstance(weight, torch.Tensor) or (bias is not None and not isinstance(bias, torch.Tensor)):
        op.problem = f"{ops.target_name(node)} has weights computed from its inputs"
        return op
    nd = weight.dim() - 2
    padding = _numeric_padding(layer.padding, tuple(int(k) for k in weight.shape[2:]), layer.dilation)
    op.data = {
        "weight": weight,
        "bias": bias,
        "stride": tuple(int(s) for s in ops_tuple(layer.stride, nd)),
        "padding": padding,
        "dilation": tuple(int(d) for d in ops_tuple(layer.dilation, nd)),
        "groups": int(layer.groups),
    }
    if layer.kind == "conv_transpose":
        extra = layer.module.output_padding if layer.module is not None else None
        if extra is None:
            extra = ops.bind(node, layer.arg_names).get("output_padding", 0)
        op.data["output_padding"] = tuple(int(x) for x in ops_tuple(extra, nd))
    if layer.padding_mode != "zeros":
        op.problem = f"{ops.target_name(node)} pads with mode {layer.padding_mode!r}"
    elif padding is None:
        op.problem = f"{ops.target_name(node)} pads unevenly ('same' with an even kernel)"
    return op


def ops_tuple(v: Any, n: int) -> tuple[Any, ...]:
    if isinstance(v, (list, tuple)):
        return tuple(v) if len(v) == n else tuple(v) * (n // max(1, len(v)))
    return (v,) * n


def _numeric_padding(padding: Any, kernel: tuple[int, ...], dilation: Any) -> tuple[int, ...] | None:
    nd = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * nd
        total = [int(d) * (k - 1) for k, d in zip(kernel, ops_tuple(dilation, nd))]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)
    return tuple(int(p) for p in ops_tuple(padding, nd))


def _affine_op(site: Any, node: fx.Node, eval_mode: bool) -> BranchOp:
    """A BatchNorm or other per-channel affine site; ``problem`` when it is no fixed affine map
    here (the statistics themselves are judged by the pass, with the fold's criteria)."""
    nodes = list(site.nodes) + ([node] if node not in site.nodes else [])
    op = BranchOp("affine", node, site.input, data={"site": site}, nodes=nodes)
    if not site.constant:
        op.problem = f"{site.kind} has statistics computed in the graph"
    elif not site.tracks_stats and site.affine is None:
        op.problem = f"{site.kind} normalizes with batch statistics"
    elif site.training and not eval_mode:
        op.problem = f"{site.kind} is in training mode"
    elif site.axis != 1:
        op.problem = f"{site.kind} scales the last axis, not the channels"
    return op


def _pool_op(gm: fx.GraphModule, node: fx.Node) -> BranchOp | None:
    if node.op == "call_module":
        m = ops.module_at(gm, str(node.target))
        if not isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)) or not node.args:
            return None
        nd = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]
        a = {k: getattr(m, k, None) for k in _POOL_ARGS[1:]}
        src = node.args[0]
    elif node.op == "call_function" and _hashable(node.target) and node.target in _AVG_POOLS:
        nd = _AVG_POOLS[node.target]
        a = ops.bind(node, _POOL_ARGS)
        src = a.get("input")
    else:
        return None
    if not isinstance(src, fx.Node):
        return None
    k = ops_tuple(a.get("kernel_size"), nd)
    stride = a.get("stride") or k
    op = BranchOp("pool", node, src, nodes=[node])
    op.data = {
        "kernel": tuple(int(x) for x in k),
        "stride": tuple(int(x) for x in ops_tuple(stride, nd)),
        "padding": tuple(int(x) for x in ops_tuple(a.get("padding") or 0, nd)),
        "divisor": a.get("divisor_override"),
    }
    if a.get("ceil_mode"):
        op.problem = "average pooling with ceil_mode=True (its last window is partial)"
    elif a.get("count_include_pad") is False and any(op.data["padding"]):
        op.problem = "average pooling with count_include_pad=False divides border windows by fewer values"
    return op


def _hashable(t: Any) -> bool:
    try:
        hash(t)
    except TypeError:
        return False
    return True


def _pad_op(gm: fx.GraphModule, node: fx.Node) -> BranchOp | None:
    if node.op != "call_function" or not _hashable(node.target) or node.target not in _PADS:
        return None
    a = ops.bind(node, _PADS[node.target])
    src, pad = a.get("input"), a.get("pad")
    if (
        not isinstance(src, fx.Node)
        or not isinstance(pad, (list, tuple))
        or not all(isinstance(p, int) for p in pad)
    ):
        return None
    op = BranchOp("pad", node, src, nodes=[node])
    if a.get("mode", "constant") != "constant":
        op.problem = f"padding with mode {a.get('mode')!r}"
        return op
    value = a.get("value")
    border: Any = torch.tensor(float(0.0 if value is None else value), dtype=torch.float64)
    writes = [u for u in node.users if _is_slice_of(u, node)]
    if writes:
        border = _border_writes(gm, node, writes, pad)
        if border is None:
            op.problem = "the padded tensor is written in place, not only at its border"
            return op
    pairs = [(int(pad[i]), int(pad[i + 1])) for i in range(0, len(pad), 2)][::-1]  # first spatial dim first
    op.nodes = [node, *writes, *(c for w in writes for c in w.users)]
    op.data = {"pads": pairs, "value": border}
    return op


def _is_slice_of(user: fx.Node, node: fx.Node) -> bool:
    return user.op == "call_function" and user.target is aten.slice.Tensor and user.args[0] is node


def _border_writes(gm: fx.GraphModule, node: fx.Node, slices: list[fx.Node], pad: Any) -> Any:
    """The per-channel value that in-place writes give the whole padded border (DBB's
    BatchNorm-and-pad layer: ``out[:, :, 0:p, :] = values`` ... , exported as ``slice`` +
    ``copy_``), or None when they write anything else."""
    shape = ops.node_shape(node)
    if shape is None:
        return None
    rank = len(shape)
    pairs = [(int(pad[i]), int(pad[i + 1])) for i in range(0, len(pad), 2)]  # last dim first
    needed = {(d, side) for d in range(len(pairs)) for side, w in enumerate(pairs[d]) if w}
    value = None
    for s in slices:
        copies = list(s.users)
        if len(copies) != 1 or copies[0].target is not aten.copy_.default or copies[0].args[0] is not s:
            return None
        dim, start, end = [*s.args[1:], None, None, None][:3]
        d = rank - 1 - int(dim) if isinstance(dim, int) else -1
        if not 0 <= d < len(pairs):
            return None
        left, right = pairs[d]
        side = (
            0 if (start in (0, None) and end == left and left) else 1 if (start == -right and right) else None
        )
        val = constant_value(gm, copies[0].args[1])
        if side is None or not isinstance(val, torch.Tensor) or val.dim() != rank or val.shape[1] != shape[1]:
            return None
        per_channel = val.double().transpose(0, 1).reshape(val.shape[1], -1)
        if not bool((per_channel == per_channel[:, :1]).all()):
            return None
        v = per_channel[:, 0].contiguous()
        if value is not None and not torch.equal(value, v):
            return None
        value = v
        needed.discard((d, side))
    return value if not needed else None
