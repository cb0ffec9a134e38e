"""A fold must never make the model slower: time the one kind of fold that can.

Matches: a fold that gives a transposed convolution without a bias a new one (BN after it,
BN over a concat or sum of it, a 1x1 one after the BN). oneDNN's CPU deconvolution adds a bias
on a slow path for 1x1 kernels and grouped layers (measured up to 2.5x the bias-free layer,
more than the BatchNorm it replaces costs), while for ordinary decoder layers the bias is
nearly free. Every other fold only rescales weights or adds to an existing bias.

Guarantees: such a fold is kept only when the layer with a bias measures no slower (within
``MARGIN``) than the layer without one plus the BatchNorm it replaces, timed on this machine, on
the layer's device and dtype, on its recorded input shape (capped in size; a nominal shape
when no example inputs were given). Results are cached per layer configuration, so identical
blocks are timed once.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bnrewrite.semantics import ops
from bnrewrite.semantics.layers import LayerSite

MARGIN = 1.03  # timing noise: a fold within 3 % of the original counts as no slower
MAX_ELEMENTS = 1 << 18  # inputs are shrunk to at most this many elements for timing
_NOMINAL_SIDE = {1: 256, 2: 32, 3: 16}
_BUDGET_S = 0.04
_ROUNDS = (5, 25)


@dataclass(frozen=True)
class Timing:
    """Median time per call of the layer with its new bias and of layer + BatchNorm as now."""

    folded_ms: float
    original_ms: float
    shape: tuple[int, ...]
    nominal: bool
    device: str

    @property
    def ratio(self) -> float:
        return self.folded_ms / self.original_ms if self.original_ms > 0 else 1.0

    @property
    def slower(self) -> bool:
        return self.ratio > MARGIN

    def describe(self) -> str:
        where = "x".join(map(str, self.shape)) + (" (nominal: pass example inputs)" if self.nominal else "")
        return (
            f"{self.folded_ms:.3g} ms with a bias vs {self.original_ms:.3g} ms with the BatchNorm "
            f"({self.ratio:.2f}x) on a {where} input, {self.device}"
        )


_cache: dict[tuple, Timing | None] = {}


def gains_bias(layer: LayerSite) -> bool:
    """True when folding creates a bias on a transposed conv that has none."""
    return layer.kind == "conv_transpose" and layer.bias is None and layer.weight is not None


def time_new_bias(layer: LayerSite, out_shape: tuple[int, ...] | None, *, bn_after: bool) -> Timing | None:
    """Time ``layer`` with a bias against ``layer`` without one plus a BatchNorm after it
    (``bn_after``) or before it. ``out_shape`` is the layer's recorded output shape. None when
    the layer cannot be run on its own here (then nothing is known against the fold)."""
    assert layer.weight is not None
    weight = layer.weight.detach()
    nd = weight.dim() - 2
    output_padding = _output_padding(layer, nd)
    in_shape, nominal = _input_shape(layer, weight, out_shape, output_padding)
    key = (
        tuple(weight.shape), weight.dtype, str(weight.device), layer.stride, str(layer.padding),
        output_padding, layer.groups, layer.dilation, in_shape, bn_after,
    )  # fmt: skip
    if key not in _cache:
        try:
            _cache[key] = _measure(layer, weight, in_shape, output_padding, bn_after, nominal)
        except (RuntimeError, NotImplementedError, ValueError):  # e.g. a dtype this backend lacks
            _cache[key] = None
    return _cache[key]


def _output_padding(layer: LayerSite, nd: int) -> tuple[int, ...]:
    if layer.module is not None:
        value = getattr(layer.module, "output_padding", 0)
    else:
        value = ops.bind(layer.node, layer.arg_names).get("output_padding", 0)
    if isinstance(value, int):
        return (value,) * nd
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (0,) * nd


def _input_shape(
    layer: LayerSite, weight: torch.Tensor, out_shape: tuple[int, ...] | None, output_padding: tuple[int, ...]
) -> tuple[tuple[int, ...], bool]:
    """The layer's input shape, recovered from its output shape (or nominal), shrunk for timing."""
    nd = weight.dim() - 2
    cin = int(weight.shape[0])
    if out_shape is None or len(out_shape) != nd + 2 or any(s <= 0 for s in out_shape):
        return (1, cin, *(_NOMINAL_SIDE.get(nd, 16),) * nd), True
    pad = layer.padding if isinstance(layer.padding, tuple) else (0,) * nd
    spatial = []
    for i in range(nd):
        k, s, d = int(weight.shape[2 + i]), layer.stride[i], layer.dilation[i]
        span = out_shape[2 + i] - 1 - d * (k - 1) - output_padding[i] + 2 * int(pad[i])
        spatial.append(max(1, span // s + 1))
    batch = out_shape[0]
    numel = batch * cin * math.prod(spatial)
    if numel > MAX_ELEMENTS:
        batch = 1
        numel = cin * math.prod(spatial)
    if numel > MAX_ELEMENTS:
        f = (MAX_ELEMENTS / numel) ** (1 / max(1, nd))
        spatial = [max(1, int(s * f)) for s in spatial]
    return (batch, cin, *spatial), False


def _measure(
    layer: LayerSite,
    weight: torch.Tensor,
    in_shape: tuple[int, ...],
    output_padding: tuple[int, ...],
    bn_after: bool,
    nominal: bool,
) -> Timing:
    nd = weight.dim() - 2
    conv_t = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    padding = layer.padding if isinstance(layer.padding, tuple) else 0
    args = (layer.stride, padding, output_padding, layer.groups, layer.dilation)
    x = torch.randn(in_shape, dtype=weight.dtype, device=weight.device)
    cout = int(weight.shape[1]) * layer.groups
    bias = torch.randn(cout, dtype=weight.dtype, device=weight.device)
    c_bn = cout if bn_after else int(weight.shape[0])
    stats = [torch.rand(c_bn, dtype=weight.dtype, device=weight.device) + 0.5 for _ in range(4)]

    def folded() -> object:
        return conv_t(x, weight, bias, *args)

    def original() -> object:
        if bn_after:
            return F.batch_norm(conv_t(x, weight, None, *args), *stats[:2], *stats[2:], False, 0.0, 1e-5)
        return conv_t(F.batch_norm(x, *stats[:2], *stats[2:], False, 0.0, 1e-5), weight, None, *args)

    t_folded, t_original = _interleaved(folded, original, weight.device)
    return Timing(t_folded * 1e3, t_original * 1e3, in_shape, nominal, str(weight.device))


def _interleaved(
    a: Callable[[], object], b: Callable[[], object], device: torch.device
) -> tuple[float, float]:
    """Median seconds per call of ``a`` and ``b``, run alternately (warm-up first)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        for f in (a, b, a, b):
            f()
        sync()
        start = time.perf_counter()
        rounds = 0
        while rounds < _ROUNDS[0] or (rounds < _ROUNDS[1] and time.perf_counter() - start < _BUDGET_S):
            for i, f in ((0, a), (1, b)) if rounds % 2 == 0 else ((1, b), (0, a)):
                t0 = time.perf_counter()
                f()
                sync()
                times[i].append(time.perf_counter() - t0)
            rounds += 1
    return statistics.median(times[0]), statistics.median(times[1])
