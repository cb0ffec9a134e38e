"""Which fx call targets are convs, linears and norms, in both dialects, and their arguments.

The module-call dialect (``symbolic_trace``) records functional calls as ``torch.conv2d``,
``F.batch_norm``, ...; the ATen dialect (``torch.export``) records ``aten.conv2d.default``,
``aten.batch_norm.default``, ... . One table maps every such target to its positional argument
names, so the rest of bnrewrite reads arguments by name and never by dialect.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from bnrewrite.errors import BnrewriteError
from bnrewrite.runtime import error_reason, run_quietly

aten = torch.ops.aten
EQUIV = "bnrewrite_equiv"  # node.meta key: name of the original node whose value a rewritten node has

_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONVOLUTION = (
    "input",
    "weight",
    "bias",
    "stride",
    "padding",
    "dilation",
    "transposed",
    "output_padding",
    "groups",
)
_LINEAR = ("input", "weight", "bias")
_F_BN = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_ATEN_BN = (
    "input",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "training",
    "momentum",
    "eps",
    "cudnn_enabled",
)
_ATEN_BN_NO_TRAIN = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")

# target -> (layer kind, argument names)
LAYER_TARGETS: dict[Any, tuple[str, tuple[str, ...]]] = {
    torch.conv1d: ("conv", _CONV),
    torch.conv2d: ("conv", _CONV),
    torch.conv3d: ("conv", _CONV),
    torch.conv_transpose1d: ("conv_transpose", _CONV_T),
    torch.conv_transpose2d: ("conv_transpose", _CONV_T),
    torch.conv_transpose3d: ("conv_transpose", _CONV_T),
    F.linear: ("linear", _LINEAR),
    aten.conv1d.default: ("conv", _CONV),
    aten.conv2d.default: ("conv", _CONV),
    aten.conv3d.default: ("conv", _CONV),
    aten.conv1d.padding: ("conv", _CONV),
    aten.conv2d.padding: ("conv", _CONV),
    aten.conv3d.padding: ("conv", _CONV),
    aten.conv_transpose1d.default: ("conv_transpose", _CONV_T),
    aten.conv_transpose2d.input: ("conv_transpose", _CONV_T),
    aten.conv_transpose3d.input: ("conv_transpose", _CONV_T),
    aten.convolution.default: ("convolution", _CONVOLUTION),
    aten.linear.default: ("linear", _LINEAR),
}

# target -> (kind label, argument names, output is a tuple whose item 0 is the result)
BN_TARGETS: dict[Any, tuple[str, tuple[str, ...], bool]] = {
    F.batch_norm: ("F.batch_norm", _F_BN, False),
    torch.batch_norm: ("torch.batch_norm", _ATEN_BN, False),
    aten.batch_norm.default: ("aten.batch_norm", _ATEN_BN, False),
    aten._native_batch_norm_legit_no_training.default: (
        "aten._native_batch_norm_legit_no_training",
        _ATEN_BN_NO_TRAIN,
        True,
    ),
}

# Per-sample norms: reported in the inventory, never folded.
OTHER_NORM_TARGETS: dict[Any, tuple[str, str]] = {
    F.group_norm: ("F.group_norm", "group"),
    F.layer_norm: ("F.layer_norm", "layer"),
    F.instance_norm: ("F.instance_norm", "instance"),
    torch.group_norm: ("torch.group_norm", "group"),
    torch.layer_norm: ("torch.layer_norm", "layer"),
    torch.instance_norm: ("torch.instance_norm", "instance"),
    aten.group_norm.default: ("aten.group_norm", "group"),
    aten.layer_norm.default: ("aten.layer_norm", "layer"),
    aten.instance_norm.default: ("aten.instance_norm", "instance"),
}

# Padding that copies real values (not zeros): commutes with a per-channel affine map.
_PAD_MODES = ("reflect", "replicate", "circular")
_COPYING_PADS = {
    aten.reflection_pad1d.default,
    aten.reflection_pad2d.default,
    aten.reflection_pad3d.default,
    aten.replication_pad1d.default,
    aten.replication_pad2d.default,
    aten.replication_pad3d.default,
    aten._pad_circular.default,
}


def is_copying_pad(node: fx.Node) -> bool:
    """True for a pad that fills with copies of the input (reflect/replicate/circular)."""
    if node.op != "call_function":
        return False
    if node.target in _COPYING_PADS:
        return True
    if node.target in (F.pad, aten.pad.default):
        a = bind(node, ("input", "pad", "mode", "value"))
        return a.get("mode", "constant") in _PAD_MODES
    return False


DROPOUT_TARGETS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, aten.dropout.default}

_DEFAULTS = {
    "bias": None,
    "stride": 1,
    "padding": 0,
    "dilation": 1,
    "groups": 1,
    "output_padding": 0,
    "weight": None,
    "training": False,
    "momentum": 0.1,
    "eps": 1e-5,
    "transposed": False,
}


def bind(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    """Map a call's positional and keyword arguments to names, filling documented defaults."""
    out = {k: v for k, v in _DEFAULTS.items() if k in names}
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out


def set_arg(node: fx.Node, names: tuple[str, ...], name: str, value: Any) -> None:
    """Set one argument of a call by name, positionally when it can be, else as a keyword."""
    index = names.index(name)
    args = list(node.args)
    if index < len(args):
        args[index] = value
        node.args = tuple(args)
    elif index == len(args) and name not in node.kwargs:
        node.args = (*args, value)
    else:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs


def is_getitem0(node: fx.Node) -> bool:
    import operator

    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and len(node.args) == 2
        and node.args[1] == 0
    )


def target_name(node: fx.Node) -> str:
    """A short readable name for what a node does."""
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return f"aten.{t._schema.name.split('::')[-1]}"
        return getattr(t, "__name__", str(t))
    if node.op == "call_method":
        return f".{node.target}()"
    return f"{node.op}:{node.target}"


_CASTS = (aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default)


def _dtype(node: Any) -> torch.dtype | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


def is_noop_cast(node: fx.Node) -> bool:
    """A dtype cast that changes nothing on the recorded run (``x.float()`` of a float32 value,
    ``.to(x.dtype)``): transparent to a fold, which never changes a dtype either."""
    cast = (node.op == "call_function" and node.target in _CASTS) or (
        node.op == "call_method" and node.target in ("float", "to", "type_as", "double", "half")
    )
    if not cast or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    before, after = _dtype(node.args[0]), _dtype(node)
    return before is not None and before == after


# -- node helpers: module paths, source lines, shapes ---------------------------------------------


def module_at(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """``root.get_submodule(path)`` by direct lookups in each module's registry: torch's walk
    costs two attribute lookups per level, and planning asks for every module several times.
    A path that is not a registered module goes to torch's walk (and its error)."""
    if not path:
        return root
    module = root
    for atom in path.split("."):
        child = module._modules.get(atom)
        if child is None:
            return root.get_submodule(path)
        module = child
    return module


def stack_path(entry: Any) -> str:
    """A module path from an ``nn_module_stack`` entry (torch.export marks repeated calls of a
    module as ``path@1``; that suffix is no part of the path)."""
    return re.sub(r"@\d+$", "", str(entry))


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # bnrewrite/
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def source_line(node: fx.Node) -> str | None:
    """``file:line`` of the user's code that created this node, when the graph recorded it."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = [f for f in _FRAME.findall(trace) if not f[0].startswith((_TORCH_DIR, _OWN_DIR))]
    if not frames:
        return None
    path, line, _func = frames[-1]
    return f"{path}:{line}"


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The output shape of a node when shape propagation or export recorded it."""
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except (TypeError, ValueError):  # symbolic sizes
            return tuple(int(s) if isinstance(s, int) else -1 for s in val.shape)
    return None


def node_rank(node: fx.Node) -> int | None:
    shape = node_shape(node)
    return None if shape is None else len(shape)


def propagate_shapes(gm: fx.GraphModule, inputs: Sequence[Any]) -> None:
    """Record shape and dtype of every node (``meta['tensor_meta']``) by running gm once."""
    try:
        run_quietly(gm, lambda: _ShapeRecorder(gm).run(*inputs))
    except Exception as exc:
        raise BnrewriteError(f"the model failed on the example inputs: {error_reason(exc)}") from exc


class _ShapeRecorder(fx.Interpreter):
    """Like torch.fx's ShapeProp, without printing tracebacks on failure."""

    def run_node(self, n: fx.Node) -> Any:
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        return result


def reads_only_stored(value: Any, limit: int = 64) -> bool:
    """True when ``value`` is computed from stored tensors alone (parameters, buffers,
    constants), never from the model's inputs: e.g. ``self.weight.reshape(1, out, -1)``."""
    if not isinstance(value, fx.Node):
        return False
    seen: set[fx.Node] = set()
    todo = [value]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" or len(seen) > limit:
            return False
        if n.op == "call_module":
            return False  # a module applied to it: treat as activations
        todo.extend(n.all_input_nodes)
    return any(n.op == "get_attr" for n in seen)
