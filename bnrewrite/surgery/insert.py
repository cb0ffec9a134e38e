"""``insert``: identity-initialized norms after conv/linear layers, pre- or post-activation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from bnrewrite.capture.capture_model import Region
from bnrewrite.diagnostics import Action, Report
from bnrewrite.errors import UsageError
from bnrewrite.fold import RewriteResult
from bnrewrite.select import Selector
from bnrewrite.semantics.layers import layer_site
from bnrewrite.semantics.norms import (
    bn_site,
    other_norm_site,
)
from bnrewrite.semantics.ops import node_shape
from bnrewrite.surgery.norm_factory import default_groups
from bnrewrite.surgery.rewriter import (
    Rewriter,
    _capture,
    _insert_module_node,
    _refused,
    finish,
)

# -- insert --------------------------------------------------------------------------------------

_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.LeakyReLU,
    nn.Hardswish,
    nn.ELU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
)
_ACT_FUNCS = {
    torch.relu,
    torch.nn.functional.relu,
    torch.nn.functional.relu6,
    torch.nn.functional.gelu,
    torch.nn.functional.silu,
    torch.nn.functional.leaky_relu,
    torch.nn.functional.hardswish,
    torch.sigmoid,
    torch.tanh,
    torch.ops.aten.relu.default,
    torch.ops.aten.gelu.default,
    torch.ops.aten.silu.default,
    torch.ops.aten.hardtanh.default,
}


def _is_activation(region: Region, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(region.gm.get_submodule(str(node.target)), _ACTIVATIONS)
    if node.op == "call_method":
        return node.target in ("relu", "sigmoid", "tanh")
    return node.op == "call_function" and node.target in _ACT_FUNCS


def _is_norm(region: Region, node: fx.Node) -> bool:
    if node.op not in ("call_module", "call_function"):
        return False
    return bn_site(region, node) is not None or other_norm_site(region, node) is not None


def identity_batchnorm(channels: int, rank: int, like: torch.Tensor) -> nn.Module:
    """A BatchNorm that is the identity in eval mode: scale 1, shift 0, mean 0, var 1 - eps."""
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[rank]
    bn = cls(channels)
    with torch.no_grad():
        bn.running_var.fill_(1.0 - bn.eps)
    return bn.to(device=like.device, dtype=like.dtype)


def insert(
    model: Any,
    after: str | Iterable[str] = "conv,linear",
    *,
    norm: str = "bn",
    position: str = "pre-act",
    select: str | Iterable[str] | None = None,
    types: Iterable[str | type] | None = None,
    example_inputs: Any = None,
    leaf_modules: Iterable[type | str] = (),
    dry_run: bool = False,
) -> RewriteResult:
    """Add a norm after every matching conv/linear that lacks one.

    ``position="pre-act"`` puts it right after the layer (conv -> BN -> act), ``"post-act"`` after
    the activation that follows it. An inserted BatchNorm is the identity in eval mode (verified);
    ``norm="gn"`` inserts GroupNorm, which changes the function (deviation reported).
    """
    kinds = {k.strip() for k in (after.split(",") if isinstance(after, str) else after) if k.strip()}
    if not kinds or kinds - {"conv", "linear", "conv_transpose"}:
        raise UsageError(f"--after {after!r}: expected a comma list of conv, conv_transpose, linear")
    if "conv" in kinds:
        kinds.add("conv_transpose")
    if norm not in ("bn", "gn"):
        raise UsageError(f"--norm {norm!r}: expected bn or gn")
    if position not in ("pre-act", "post-act"):
        raise UsageError(f"--position {position!r}: expected pre-act or post-act")
    selector = Selector.of(select, types)
    cap = _capture(model, example_inputs, leaf_modules)
    report = Report("insert", type(model).__name__, dialect=cap.dialect, opaque=list(cap.opaque))
    rw = Rewriter(
        cap,
        report,
        redo=lambda sub, x, at: (
            insert(
                sub,
                after=after,
                norm=norm,
                position=position,
                select=selector.under(at),
                example_inputs=x,
                leaf_modules=leaf_modules,
            ).model
        ),
    )
    for region in cap.regions:
        for node in list(region.gm.graph.nodes):
            if node.op not in ("call_module", "call_function"):
                continue
            layer = layer_site(region, node)
            if layer is None or layer.kind not in kinds or layer.weight is None:
                continue
            path = layer.module_path
            kind = type(layer.module).__name__ if layer.module is not None else str(layer.kind)
            if not selector.matches(path, kind):
                continue
            _insert_after(rw, report, region, layer, norm, position)
    return finish(rw, report, model, dry_run)


def _insert_after(rw: Rewriter, report: Report, region: Region, layer: Any, norm: str, position: str) -> None:
    node = layer.node
    label = layer.module_path or layer.name
    anchor = node
    if position == "post-act":
        users = list(node.users)
        if len(users) != 1 or not _is_activation(region, users[0]):
            _refused(report, layer.module_path, layer.name, "no single activation follows it (post-act)")
            return
        anchor = users[0]
    if any(_is_norm(region, u) for u in anchor.users):
        return  # already normalized: nothing to insert
    weight = layer.weight
    channels = int(weight.shape[1] * layer.groups if layer.kind == "conv_transpose" else weight.shape[0])
    if layer.kind == "linear":
        shape = node_shape(anchor)
        if shape is None:
            _refused(
                report, layer.module_path, layer.name, "output rank unknown for a Linear: pass example inputs"
            )
            return
        if len(shape) != 2:
            _refused(
                report,
                layer.module_path,
                layer.name,
                f"Linear output has rank {len(shape)}; BatchNorm1d needs (N, C)",
            )
            return
        rank = 2
    else:
        rank = weight.dim()
    if norm == "bn":
        module: nn.Module = identity_batchnorm(channels, rank, weight)
        exact, note = True, "identity in eval mode (scale 1, shift 0, mean 0, var 1 - eps)"
    else:
        g = default_groups(channels)
        module = nn.GroupNorm(g, channels).to(device=weight.device, dtype=weight.dtype)
        exact, note = False, f"GroupNorm({g}, {channels}) normalizes per sample"
    module.train(layer.module.training if layer.module is not None else region.gm.training)
    name = (str(node.target) if node.op == "call_module" else node.name) + "_norm"
    while _exists(region.gm, name):
        name += "_"
    _insert_module_node(rw, region, anchor, name, module)
    report.actions.append(
        Action(
            "insert",
            region.qualify(anchor.name),
            label,
            f"{type(module).__name__}({channels}) after {label} ({position}): {note}",
            target=name,
            exact=exact,
        )
    )


def _exists(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False
