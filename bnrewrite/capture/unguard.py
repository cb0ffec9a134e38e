"""Give an exported module's graph back its shape freedom when nothing in it depends on shapes.

``torch.export`` specializes to the example inputs: the module it returns checks every call
against their shapes (batch size and spatial size included) and packs arguments through pytree
specs. A module that replaces one of the user's blocks must accept what the block accepted.
When every op of the (folded, merged) graph works on any shape - convs, activations, sums,
BatchNorm, pooling by kernel, no sizes baked into views or expands - the guards protect nothing,
so they go, and tensors in give tensors out directly (the guards alone cost ~0.1 ms a call).
A graph that still has a shape-specialized op keeps its guards.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

# ATen ops whose arguments hold no sizes of the input (kernel sizes and dims are not sizes)
_SHAPE_FREE = {
    "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "linear", "addmm", "mm", "t", "matmul", "relu", "relu_", "relu6", "silu", "silu_", "gelu", "sigmoid",
    "tanh", "hardswish", "hardswish_", "hardsigmoid", "hardtanh", "hardtanh_", "leaky_relu", "elu", "mish",
    "softmax", "log_softmax", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "batch_norm",
    "_native_batch_norm_legit_no_training", "layer_norm", "group_norm", "avg_pool1d", "avg_pool2d",
    "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "mean", "sum", "cat", "permute", "transpose", "flatten", "clone", "contiguous",
    "dropout", "alias", "detach", "_assert_tensor_metadata", "to", "_to_copy", "sqrt", "rsqrt", "pow", "exp",
}  # fmt: skip


def _shape_free(node: fx.Node) -> bool:
    if node.op != "call_function":
        return True
    if node.target is operator.getitem:
        return True
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target.overloadpacket.__name__ in _SHAPE_FREE
    return False


def drop_export_guards(gm: fx.GraphModule) -> bool:
    """Plain tensors in and out, no shape guards, when the graph allows it; True if done."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or not all(_shape_free(n) for n in gm.graph.nodes):
        return False
    in_spec, out_spec = info.in_spec, info.out_spec
    args_spec, kwargs_spec = in_spec.children() if in_spec.num_children == 2 else (None, None)
    if args_spec is None or kwargs_spec.num_leaves or not all(c.is_leaf() for c in args_spec.children()):
        return False
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = output.args[0]
    if out_spec.is_leaf() and isinstance(values, (tuple, list)) and len(values) == 1:
        output.args = (values[0],)
    elif not (out_spec.type is tuple and all(c.is_leaf() for c in out_spec.children())):
        return False
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn" and not n.users:
            gm.graph.erase_node(n)
    gm.graph._codegen = fx.graph.CodeGen()
    if hasattr(gm, "_guards_fn"):
        del gm._guards_fn
    for hook_id in list(gm._forward_pre_hooks):
        del gm._forward_pre_hooks[hook_id]  # export's input-spec checks
    gm.recompile()
    return True
