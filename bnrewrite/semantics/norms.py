"""Find norm layers and conv/linear layers in a captured graph, in every form they take.

A BatchNorm may be an ``nn.BatchNorm*``/``SyncBatchNorm`` call, a frozen-BN style module, a
functional ``F.batch_norm`` or an ATen ``batch_norm``; a conv may be a module or a functional
call with stored weights. :class:`BNSite` and :class:`LayerSite` give rules and passes one view
of all of them: the tensors involved, the flags, and whether everything is a stored constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from bnrewrite.semantics import ops

if TYPE_CHECKING:
    from bnrewrite.semantics.captured import Capture, Region

_STAT_NAMES = ("weight", "bias", "running_mean", "running_var")


def is_batchnorm_module(m: nn.Module) -> bool:
    """A BatchNorm by class (``_BatchNorm``, not InstanceNorm). Whether it is *only* a BatchNorm
    depends on its forward: see :func:`forward_is_torchs` and :func:`is_plain_norm_module`."""
    return isinstance(m, _BatchNorm) and not isinstance(m, _InstanceNorm)


def forward_is_torchs(m: nn.Module) -> bool:
    """True when the module's class runs torch's own ``forward`` (not overridden outside
    ``torch.nn``): then the module computes exactly the norm its class names."""
    return str(getattr(type(m).forward, "__module__", "")).startswith("torch.nn.")


def is_plain_norm_module(m: nn.Module) -> bool:
    """A norm module that can be kept as one call and treated as the norm its class names:
    torch's own forward, or bnrewrite's own norm classes (``FrozenBatchNorm``,
    ``_bnrewrite_norm_family``). A subclass whose forward also applies an activation, dropout, a
    cast or a residual is no plain norm: it is traced through, and the fold keeps what its
    forward does beyond the norm. A user's frozen BN is traced through too: its ops are judged
    by what they compute (:mod:`~bnrewrite.semantics.affine_sites`), whatever their spelling."""
    if not is_norm_module(m):
        return False
    cls = type(m)
    return forward_is_torchs(m) or bool(
        getattr(cls, "_bnrewrite_frozen", False) or getattr(cls, "_bnrewrite_norm_family", None)
    )


def is_frozen_bn_module(m: nn.Module) -> bool:
    """Frozen BN (torchvision/detectron style): fixed stats and affine stored as buffers.

    Reads ``_buffers``/``_parameters`` directly: during tracing, attribute access on modules is
    patched and costs a scan of the whole model.
    """
    if isinstance(m, _BatchNorm):
        return False
    cls = type(m)
    if "frozen" not in cls.__name__.lower() and not getattr(cls, "_bnrewrite_frozen", False):
        return False
    tensors = {**m._parameters, **m._buffers}
    return all(isinstance(tensors.get(n), torch.Tensor) for n in _STAT_NAMES)


def norm_with_stats(m: nn.Module) -> bool:
    """A module that normalizes with running statistics of its own: a BatchNorm class (plain
    or doing more), a frozen BN, or a module holding ``running_mean``/``running_var`` and no
    conv/linear layer (an in-place-ABN style norm with its own parameters)."""
    if is_batchnorm_module(m) or is_frozen_bn_module(m):
        return True
    own = m._buffers
    stats = isinstance(own.get("running_mean"), torch.Tensor) and isinstance(
        own.get("running_var"), torch.Tensor
    )
    return stats and not any(isinstance(c, (_ConvNd, nn.Linear)) for c in m.modules())


def other_norm_family(m: nn.Module) -> str | None:
    if isinstance(m, nn.GroupNorm):
        return "group"
    if isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return "layer"
    if getattr(type(m), "_bnrewrite_norm_family", None):
        return type(m)._bnrewrite_norm_family
    if isinstance(m, _InstanceNorm):
        return "instance"
    return None


def is_norm_module(m: nn.Module) -> bool:
    return is_batchnorm_module(m) or is_frozen_bn_module(m) or other_norm_family(m) is not None


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _tensor_arg(gm: fx.GraphModule, arg: Any) -> tuple[torch.Tensor | None, bool]:
    """(tensor, is_constant) for a call argument: None, a get_attr node, or something computed."""
    if arg is None:
        return None, True
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = fetch_attr(gm, str(arg.target))
        if isinstance(value, torch.Tensor):
            return value, True
    return None, False


@dataclass
class BNSite:
    """One BatchNorm-like application in a graph."""

    region: Region | None  # None for a module called only from untraceable code
    node: fx.Node | None  # the node whose value is the normalized tensor
    call: fx.Node | None  # the call itself (differs from node for tuple-returning ATen ops)
    input: fx.Node | None
    kind: str
    module: nn.Module | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    eps: float
    training: bool
    tracks_stats: bool
    constant: bool
    frozen: bool = False
    num_batches_tracked: torch.Tensor | None = None
    extra: tuple[fx.Node, ...] = ()  # the other ops of a BatchNorm computed op by op (ATen frozen BN)
    affine: tuple[torch.Tensor, torch.Tensor] | None = None  # evaluated scale, shift (affine sites)
    axis: int = 1  # the channel axis: 1, or -1 (the last dim of a token tensor)
    like: torch.Tensor | None = None  # dtype and device of the stored tensors (affine sites)

    @property
    def is_affine_layer(self) -> bool:
        """An affine site without running statistics (an ``Affine`` or layer-scale layer): it
        folds like a BatchNorm, but it is no norm to swap, remove or recalibrate."""
        return self.affine is not None and self.running_var is None

    @property
    def nodes(self) -> tuple[fx.Node, ...]:
        """Every node that applies this BatchNorm (the call, plus ``extra``)."""
        return (self.call, *self.extra) if self.call is not None else self.extra

    @property
    def module_path(self) -> str | None:
        return self.region.module_path(self.call) if self.region and self.call else None

    @property
    def name(self) -> str:
        return self.region.qualify(self.node.name) if self.region and self.node else "?"

    @property
    def num_features(self) -> int | None:
        if self.affine is not None:
            return int(self.affine[0].numel())
        t = self.running_mean if self.running_mean is not None else self.weight
        return None if t is None else int(t.numel())

    def eval_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode ``y = x * scale + shift`` per channel, computed in float64 (for an affine
        site: what evaluating its ops gave)."""
        if self.affine is not None:
            return self.affine
        assert self.running_mean is not None and self.running_var is not None
        var = self.running_var.detach().double()
        mean = self.running_mean.detach().double()
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.detach().double()
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.detach().double()
        return scale, shift


@dataclass
class OtherNormSite:
    """A per-sample norm (GroupNorm, LayerNorm, InstanceNorm): inventoried, never folded."""

    region: Region
    node: fx.Node
    kind: str
    family: str

    @property
    def module_path(self) -> str | None:
        return self.region.module_path(self.node)

    @property
    def name(self) -> str:
        return self.region.qualify(self.node.name)


def module_bn_site(m: nn.Module, region: Region | None = None, node: fx.Node | None = None) -> BNSite | None:
    """The BatchNorm a BatchNorm-like module applies (with its graph position when known)."""
    inp = _first_input(node) if node is not None else None
    if is_batchnorm_module(m):
        tensors = _own_tensors(m, ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"))
        weight, bias, mean, var, batches = tensors
        tracks = m.track_running_stats and mean is not None
        return BNSite(
            region, node, node, inp, type(m).__name__, m,
            weight if m.affine else None, bias if m.affine else None,
            mean, var, float(m.eps), bool(m.training), bool(tracks), True,
            num_batches_tracked=batches,
        )  # fmt: skip
    if is_frozen_bn_module(m):
        return BNSite(
            region, node, node, inp, type(m).__name__, m, m.weight, m.bias, m.running_mean,
            m.running_var, float(getattr(m, "eps", 1e-5)), False, True, True, frozen=True,
        )  # fmt: skip
    return None


def _own_tensors(m: nn.Module, names: tuple[str, ...]) -> list[Any]:
    """``getattr(m, name)`` for each name, read from the module's own tables where it keeps them
    there (``nn.Module.__getattr__`` costs a microsecond per access; a plan reads them often)."""
    params, buffers = m._parameters, m._buffers
    out = []
    for name in names:
        if name in params:
            out.append(params[name])
        elif name in buffers:
            out.append(buffers[name])
        else:
            out.append(getattr(m, name, None))
    return out


def bn_site(region: Region, node: fx.Node) -> BNSite | None:
    """The BatchNorm applied by ``node``, if it applies one."""
    gm = region.gm
    if node.op == "call_module":
        return module_bn_site(ops.module_at(gm, str(node.target)), region, node)
    if node.op not in ("call_function", "call_method"):
        return None
    if node.op == "call_method" or node.target not in ops.BN_TARGETS:
        return affine_site(region, node)
    kind, names, tuple_out = ops.BN_TARGETS[node.target]
    if ops.reads_only_stored(ops.bind(node, names).get("input")):
        return None  # normalizes a parameter (weight standardization), not activations
    out = node
    if tuple_out:
        items = [u for u in node.users if ops.is_getitem0(u)]
        if len(items) != 1 or len(node.users) != 1:
            return None
        out = items[0]
    a = ops.bind(node, names)
    tensors = {}
    constant = True
    for n in _STAT_NAMES:
        t, is_const = _tensor_arg(gm, a.get(n))
        tensors[n] = t
        constant = constant and is_const
    training = a.get("training", False)
    if isinstance(training, fx.Node):
        constant, training = False, True
    eps = a.get("eps", 1e-5)
    if isinstance(eps, fx.Node):
        constant, eps = False, 1e-5
    tracks = a.get("running_mean") is not None and a.get("running_var") is not None
    return BNSite(
        region,
        out,
        node,
        a["input"] if isinstance(a.get("input"), fx.Node) else None,
        kind,
        None,
        tensors["weight"],
        tensors["bias"],
        tensors["running_mean"],
        tensors["running_var"],
        float(eps),
        bool(training),
        tracks,
        constant,
    )


def affine_site(region: Region, node: fx.Node) -> BNSite | None:
    """The affine site (see :mod:`~bnrewrite.semantics.affine_sites`) whose output ``node`` is: a
    frozen BN of any spelling, an ``Affine`` or layer-scale layer. Its scale and shift are what
    evaluating its ops gave; a frozen BN also carries its statistics (for swaps)."""
    from bnrewrite.semantics.affine_sites import affine_groups

    group = affine_groups(region)[0].get(node)
    if group is None:
        return None
    module = region.gm.get_submodule(group.path) if _has_module(region.gm, group.path) else None
    tensors = {**module._parameters, **module._buffers} if module is not None else {}
    stats = {n: tensors.get(n) if isinstance(tensors.get(n), torch.Tensor) else None for n in _STAT_NAMES}
    has_stats = stats["running_mean"] is not None and stats["running_var"] is not None
    like = next((t for t in tensors.values() if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
    return BNSite(
        region, group.output, group.output, group.input, group.kind, None,
        stats["weight"] if has_stats else None, stats["bias"] if has_stats else None,
        stats["running_mean"], stats["running_var"], float(getattr(module, "eps", 1e-5)), False, True,
        True, frozen=True, extra=tuple(n for n in group.nodes if n is not group.output),
        affine=(group.scale, group.shift), axis=group.axis, like=like,
    )  # fmt: skip


def _has_module(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


def other_norm_site(region: Region, node: fx.Node) -> OtherNormSite | None:
    if node.op == "call_module":
        m = ops.module_at(region.gm, str(node.target))
        family = other_norm_family(m)
        return OtherNormSite(region, node, type(m).__name__, family) if family else None
    if node.op == "call_function" and node.target in ops.OTHER_NORM_TARGETS:
        kind, family = ops.OTHER_NORM_TARGETS[node.target]
        return OtherNormSite(region, node, kind, family)
    return None


def _first_input(node: fx.Node) -> fx.Node | None:
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def find_norms(cap: Capture) -> tuple[list[BNSite], list[OtherNormSite]]:
    """Every BatchNorm and every per-sample norm applied in the captured graphs, in order."""
    bns: list[BNSite] = []
    others: list[OtherNormSite] = []
    for region in cap.regions:
        for node in region.gm.graph.nodes:
            if node.op not in ("call_module", "call_function"):
                continue
            site = bn_site(region, node)
            if site is not None:
                bns.append(site)
                continue
            other = other_norm_site(region, node)
            if other is not None:
                others.append(other)
    return bns, others


@dataclass
class Lookalike:
    """A module that looks like a norm or an affine layer but is no foldable site, and why."""

    region: Region
    module_path: str
    kind: str
    reason: str


def lookalikes(cap: Capture) -> list[Lookalike]:
    """Modules that look like a frozen BN / Affine / layer-scale (by class name or running
    statistics) whose ops are not a per-channel affine map of one input: never left silent."""
    from bnrewrite.semantics.affine_sites import affine_groups

    found = []
    for region in cap.regions:
        for local, (kind, why) in affine_groups(region)[1].items():
            path = f"{region.path}.{local}" if region.path else local
            found.append(Lookalike(region, path, kind, why))
    return found


@dataclass
class OpaqueNorm:
    """A norm module that only untraceable code calls, and why that code is opaque."""

    module_path: str
    module: nn.Module
    where: str
    reason: str


def opaque_norms(cap: Capture) -> list[OpaqueNorm]:
    """Norm modules that sit in code no captured region covers."""
    if cap.whole or not isinstance(cap.model, nn.Module) or isinstance(cap.model, fx.GraphModule):
        return []
    covered = [r.path for r in cap.regions]
    found = []
    for path, m in cap.model.named_modules():
        if not path or not is_norm_module(m):
            continue
        if any(path == p or path.startswith(p + ".") for p in covered):
            continue
        owner = max(
            (o for o in cap.opaque if o.module_path == "" or path.startswith(o.module_path + ".")),
            key=lambda o: len(o.module_path),
            default=None,
        )
        where = (owner.module_path or "<root>") if owner else "<root>"
        found.append(OpaqueNorm(path, m, where, owner.reason if owner else "not traced"))
    return found
