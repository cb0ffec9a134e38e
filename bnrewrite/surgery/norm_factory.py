"""Build the replacement norm module for a swap, keeping learned scale and shift.

Every builder returns the new module and a note on what it preserves: ``exact`` when the new
module computes the same function in eval mode (then it is verified), otherwise the reason the
function changes. A refusal raises :class:`SwapRefused` with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from bnrewrite.modules import ChannelwiseLayerNorm, FrozenBatchNorm
from bnrewrite.semantics.norms import BNSite

TARGETS = ("gn", "ln", "in", "bn", "frozen", "sync")
LN_DIMS = ("chw", "c")


class SwapRefused(Exception):
    """This layer cannot be swapped to the requested norm; the message says why."""


@dataclass
class Built:
    module: nn.Module
    exact: bool
    note: str


def default_groups(channels: int, limit: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``limit`` (Opacus: gcd(32, C))."""
    return max(g for g in range(1, min(channels, limit) + 1) if channels % g == 0)


def _copy_affine(dst: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        if weight is not None and getattr(dst, "weight", None) is not None:
            dst.weight.copy_(weight.detach().reshape(dst.weight.shape))
        if bias is not None and getattr(dst, "bias", None) is not None:
            dst.bias.copy_(bias.detach().reshape(dst.bias.shape))


def _like(module: nn.Module, ref: torch.Tensor | None) -> nn.Module:
    if ref is not None:
        module = module.to(device=ref.device, dtype=ref.dtype)
    return module


def _bn_class(rank: int | None) -> type[nn.Module]:
    return {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(
        rank or 0, nn.BatchNorm2d
    )


def _in_class(rank: int | None) -> type[nn.Module]:
    if rank not in (3, 4, 5):
        raise SwapRefused(f"InstanceNorm needs inputs with spatial dims (rank 3-5), got rank {rank}")
    return {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}[rank]


@dataclass
class _Source:
    """What every builder reads of the BatchNorm it replaces."""

    site: BNSite
    c: int
    shape: tuple[int, ...] | None
    rank: int | None
    spatial: int | None
    ref: torch.Tensor | None


def from_batchnorm(
    site: BNSite,
    to: str,
    *,
    shape: tuple[int, ...] | None,
    groups: int | None = None,
    ln_dims: str = "chw",
) -> Built:
    """Replacement for one BatchNorm site (module or functional)."""
    c = site.num_features
    if c is None:
        raise SwapRefused("number of channels unknown")
    rank = len(shape) if shape is not None else None
    spatial = math.prod(shape[2:]) if shape is not None and len(shape) > 2 else (1 if rank == 2 else None)
    ref = site.weight if site.weight is not None else site.running_mean
    src = _Source(site, c, shape, rank, spatial, ref)
    if to == "gn":
        return _to_group_norm(src, groups)
    if to == "ln":
        return _to_layer_norm(src, ln_dims)
    if to == "in":
        return _to_instance_norm(src)
    if to == "frozen":
        return _to_frozen(src)
    if to in ("sync", "bn"):
        return _to_batch_norm(src, to)
    raise SwapRefused(f"unknown target {to!r}; expected one of {', '.join(TARGETS)}")


def _to_group_norm(src: _Source, groups: int | None) -> Built:
    site, c, spatial = src.site, src.c, src.spatial
    g = groups or default_groups(c)
    if c % g:
        raise SwapRefused(f"{g} groups do not divide {c} channels")
    per_group = (c // g) * spatial if spatial is not None else None
    if per_group is not None and per_group <= 1:
        raise SwapRefused(
            f"GroupNorm({g}, {c}) on input shape {src.shape} normalizes {per_group} value per group: "
            "the output would be the bias alone"
        )
    if per_group is None and c // g <= 1:
        raise SwapRefused(
            f"GroupNorm({g}, {c}) has one channel per group and the input shape is unknown: pass example inputs"
        )
    new = nn.GroupNorm(g, c, eps=site.eps, affine=True)
    _copy_affine(new, site.weight, site.bias)
    return Built(
        _like(new, src.ref),
        False,
        f"GroupNorm({g}, {c}): per-sample statistics over groups of {c // g} channels",
    )


def _to_layer_norm(src: _Source, ln_dims: str) -> Built:
    site, c = src.site, src.c
    if ln_dims not in LN_DIMS:
        raise SwapRefused(f"--ln-dims {ln_dims!r}: expected chw or c")
    if src.rank == 2 or ln_dims == "c":
        new: nn.Module = ChannelwiseLayerNorm(c, eps=site.eps)
        dims = "the channel dim at each position (LayerNorm over C)"
    else:
        if src.spatial is not None and c * src.spatial <= 1:
            raise SwapRefused(f"LayerNorm over a single value (input shape {src.shape})")
        new = nn.GroupNorm(1, c, eps=site.eps, affine=True)
        dims = "channels and spatial dims together (GroupNorm(1, C) = LayerNorm over C,H,W)"
    _copy_affine(new, site.weight, site.bias)
    return Built(_like(new, src.ref), False, f"normalizes {dims}")


def _to_instance_norm(src: _Source) -> Built:
    site = src.site
    if src.spatial is not None and src.spatial <= 1:
        raise SwapRefused(
            f"InstanceNorm over one spatial position (input shape {src.shape}) outputs only the bias"
        )
    affine = site.weight is not None or site.bias is not None
    new = _in_class(src.rank)(src.c, eps=site.eps, affine=affine)
    _copy_affine(new, site.weight, site.bias)
    return Built(_like(new, src.ref), False, "per-sample, per-channel statistics over spatial dims")


def _to_frozen(src: _Source) -> Built:
    site = src.site
    if site.running_mean is None or site.running_var is None:
        raise SwapRefused("no running statistics to freeze (track_running_stats=False)")
    new = FrozenBatchNorm(src.c, eps=site.eps)
    with torch.no_grad():
        new.running_mean.copy_(site.running_mean.detach())
        new.running_var.copy_(site.running_var.detach())
        if site.weight is not None:
            new.weight.copy_(site.weight.detach())
        if site.bias is not None:
            new.bias.copy_(site.bias.detach())
    return Built(_like(new, src.ref), True, "fixed statistics and affine: eval-mode BatchNorm in every mode")


def _to_batch_norm(src: _Source, to: str) -> Built:
    site = src.site
    if (
        to == "bn"
        and site.module is not None
        and not isinstance(site.module, nn.SyncBatchNorm)
        and not site.frozen
    ):
        raise SwapRefused("already a BatchNorm")
    momentum = getattr(site.module, "momentum", 0.1) if site.module is not None else 0.1
    affine = site.weight is not None or site.bias is not None
    options = {
        "eps": site.eps,
        "momentum": momentum,
        "affine": affine,
        "track_running_stats": site.tracks_stats,
    }
    if to == "sync":
        new: nn.Module = nn.SyncBatchNorm(src.c, **options)
    elif src.rank is None:
        raise SwapRefused(
            "the input rank is unknown, so BatchNorm1d/2d/3d cannot be chosen: pass example inputs"
        )
    else:
        new = _bn_class(src.rank)(src.c, **options)
    with torch.no_grad():
        if site.tracks_stats:
            new.running_mean.copy_(site.running_mean.detach())
            new.running_var.copy_(site.running_var.detach())
            if site.num_batches_tracked is not None:
                new.num_batches_tracked.copy_(site.num_batches_tracked)
    _copy_affine(new, site.weight, site.bias)
    new.train(site.training)
    return Built(_like(new, src.ref), True, "same statistics and affine: identical in eval mode")


def to_batchnorm(module: nn.Module, *, shape: tuple[int, ...] | None) -> Built:
    """BatchNorm replacing a GroupNorm/LayerNorm/InstanceNorm, keeping its per-channel affine."""
    rank = len(shape) if shape is not None else None
    if isinstance(module, nn.GroupNorm):
        c, weight, bias, eps = module.num_channels, module.weight, module.bias, module.eps
    elif isinstance(module, nn.modules.instancenorm._InstanceNorm):
        c, weight, bias, eps = module.num_features, module.weight, module.bias, module.eps
    elif isinstance(module, (nn.LayerNorm, ChannelwiseLayerNorm)):
        ns = tuple(getattr(module, "normalized_shape", (getattr(module, "num_features", 0),)))
        if len(ns) != 1:
            raise SwapRefused(f"LayerNorm over {ns} has no per-channel equivalent")
        c, weight, bias, eps = ns[0], module.weight, module.bias, module.eps
        if isinstance(module, nn.LayerNorm) and rank not in (2, None):
            raise SwapRefused(f"LayerNorm on rank-{rank} input normalizes the last dim, not channels")
    else:
        raise SwapRefused(f"{type(module).__name__} is not a GroupNorm, LayerNorm or InstanceNorm")
    if rank is None:
        raise SwapRefused(
            "the input rank is unknown, so BatchNorm1d/2d/3d cannot be chosen: pass example inputs"
        )
    new = _bn_class(rank)(c, eps=eps, affine=True)
    _copy_affine(new, weight, bias)
    new = _like(new, weight)
    new.train(module.training)
    return Built(
        new, False, "batch statistics; running statistics start at mean 0, var 1: recalibrate before eval"
    )
