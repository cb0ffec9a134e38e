"""Conv, transposed-conv and linear layers in a captured graph, module calls or functional calls
on stored weights alike: :class:`LayerSite` gives passes and rules one view of the tensors and
hyperparameters a fold rewrites."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from bnrewrite.semantics import ops
from bnrewrite.semantics.norms import _tensor_arg

if TYPE_CHECKING:
    from bnrewrite.semantics.captured import Region


@dataclass
class LayerSite:
    """A conv, transposed conv or linear application with its (stored) weights."""

    region: Region
    node: fx.Node
    kind: str  # "conv" | "conv_transpose" | "linear"
    module: nn.Module | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: Any
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    constant: bool
    arg_names: tuple[str, ...] = ()

    @property
    def module_path(self) -> str | None:
        return self.region.module_path(self.node)

    @property
    def name(self) -> str:
        return self.region.qualify(self.node.name)

    @property
    def kernel(self) -> tuple[int, ...]:
        assert self.weight is not None
        return tuple(int(k) for k in self.weight.shape[2:])

    def zero_pads(self) -> bool:
        """True when the layer reads zero-padded positions of its input."""
        if self.kind == "linear" or self.padding_mode != "zeros":
            return False
        if isinstance(self.padding, str):
            if self.padding == "valid":
                return False
            return any((k - 1) * d > 0 for k, d in zip(self.kernel, _ntuple(self.dilation, len(self.kernel))))
        return any(int(p) != 0 for p in _ntuple(self.padding, max(1, len(self.kernel))))


def _ntuple(v: Any, n: int) -> tuple[Any, ...]:
    if isinstance(v, (list, tuple)):
        return tuple(v) if len(v) == n else tuple(v) * (n // max(1, len(v)))
    return (v,) * n


def layer_site(region: Region, node: fx.Node) -> LayerSite | None:
    """The conv/linear applied by ``node``, if it applies one."""
    gm = region.gm
    if node.op == "call_module":
        m = ops.module_at(gm, str(node.target))
        if isinstance(m, _ConvNd):
            kind = "conv_transpose" if isinstance(m, _ConvTransposeNd) else "conv"
            return LayerSite(
                region,
                node,
                kind,
                m,
                m.weight,
                m.bias,
                tuple(m.stride),
                m.padding,
                tuple(m.dilation),
                int(m.groups),
                str(m.padding_mode),
                True,
            )
        if isinstance(m, nn.Linear):
            return LayerSite(region, node, "linear", m, m.weight, m.bias, (), 0, (), 1, "zeros", True)
        return None
    if node.op != "call_function" or node.target not in ops.LAYER_TARGETS:
        return None
    kind, names = ops.LAYER_TARGETS[node.target]
    a = ops.bind(node, names)
    if kind == "convolution":
        transposed = a.get("transposed")
        if not isinstance(transposed, bool):
            return None
        kind = "conv_transpose" if transposed else "conv"
    weight, w_const = _tensor_arg(gm, a.get("weight"))
    bias, b_const = _tensor_arg(gm, a.get("bias"))
    constant = w_const and b_const and weight is not None
    nd = (weight.dim() - 2) if weight is not None else 1
    if kind == "linear":
        return LayerSite(region, node, kind, None, weight, bias, (), 0, (), 1, "zeros", constant, names)
    groups = a.get("groups", 1)
    if not isinstance(groups, int):
        constant, groups = False, 1
    padding = a.get("padding", 0)
    return LayerSite(
        region,
        node,
        kind,
        None,
        weight,
        bias,
        tuple(_ntuple(a.get("stride", 1), nd)),
        padding if isinstance(padding, str) else tuple(_ntuple(padding, nd)),
        tuple(_ntuple(a.get("dilation", 1), nd)),
        int(groups),
        "zeros",
        constant,
        names,
    )


def is_dropout(region: Region, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(ops.module_at(region.gm, str(node.target)), nn.modules.dropout._DropoutNd)
    return node.op == "call_function" and node.target in ops.DROPOUT_TARGETS


def module_layer(root: Any, layer: LayerSite) -> LayerSite | None:
    """A functional layer as the module whose own weight and bias it applies (an ATen graph of
    ``nn.Linear``/``nn.Conv*``: the op runs in that module and reads its tensors), or None:
    computed or foreign weights."""
    path = layer.module_path or ""
    try:
        module = root.get_submodule(path) if isinstance(root, nn.Module) else None
    except AttributeError:
        return None
    if not isinstance(module, (nn.Linear, _ConvNd)) or module.weight is not layer.weight:
        return None
    if module.bias is not layer.bias or not layer.node.meta.get("nn_module_stack"):
        return None
    return dataclasses.replace(layer, module=module)
