"""What a fold does to low-precision deployment: the folded weights' numbers, and findings PR001-PR005.

Folding multiplies each output channel of a layer by ``gamma / sqrt(running_var + eps)``. Where
that factor is large the folded weights grow by orders of magnitude: they may leave float16's
range (PR001), spread so far between channels that per-tensor int8 loses the small ones
(PR002), underflow into subnormals (PR003); the BatchNorm itself may be so ill-conditioned that
folding amplifies rounding (PR004); a channel whose scale is zero is constant (PR005).

Matches: a layer's (folded) weight and bias, or a BatchNorm's per-channel scale.
Guarantees: every number in an entry is computed from the tensors (no sampling); each finding
names the layer, the channels (up to 8, then a count) and the numbers behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from bnrewrite.codes import finding
from bnrewrite.diagnostics import Diagnostic

FP16_MAX = 65504.0
_TINY = {  # smallest normal value: below it (and not zero) a value is subnormal
    torch.float32: 1.1754943508222875e-38,
    torch.float16: 6.103515625e-05,
    torch.bfloat16: 1.1754943508222875e-38,
}
DTYPE_MAX = {
    torch.float16: FP16_MAX,
    torch.bfloat16: 3.3895313892515355e38,
    torch.float32: 3.4028234663852886e38,
}
DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PrecisionThresholds:
    """When a number becomes a finding (``[tool.bnrewrite.precision]`` in pyproject.toml)."""

    int8_spread: float = 16.0  # PR002: largest / smallest per-channel weight range
    sqnr_gap_db: float = 6.0  # PR002: and per-tensor int8 loses this much SQNR against per-channel
    ill_conditioned_scale: float = 1000.0  # PR004: |gamma| / sqrt(var + eps) above this
    target_dtype: torch.dtype | None = None  # PR001/PR003 also judged in this dtype


def _channels(idx: torch.Tensor, limit: int = 8) -> str:
    items = [int(i) for i in idx.flatten().tolist()]
    shown = ", ".join(str(i) for i in items[:limit])
    return f"[{shown}{f', ... {len(items) - limit} more' if len(items) > limit else ''}]"


def per_channel(weight: torch.Tensor, kind: str, groups: int) -> torch.Tensor:
    """The weight as ``(out_channels, -1)``: one row per output channel of the layer (float32
    at least: the numbers describe float32-or-narrower storage, and float64 would double the cost)."""
    w = weight.detach()
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    if kind == "conv_transpose":  # [in, out/groups, k...] -> [out, in/groups * k...]
        cin, cout_g = w.shape[0], w.shape[1]
        return w.reshape(groups, cin // groups, cout_g, -1).permute(0, 2, 1, 3).reshape(groups * cout_g, -1)
    return w.reshape(w.shape[0], -1)


def int8_sqnr_db(rows: torch.Tensor, per_channel_scale: bool) -> float:
    """SQNR (dB) of symmetric int8 quantization of ``rows`` (one output channel each), per tensor
    or per channel, averaged over the channels (each channel's own signal over its own noise: a
    small channel rounded to a few levels counts as much as a large one; capped at 100 dB)."""
    entry = measure_layers([measure_item("rows", rows, None, "linear", 1)])[0]
    return entry.per_channel_db if per_channel_scale else entry.per_tensor_db


_CAP_DB = 100.0


@dataclass
class LayerPrecision:
    """One folded layer's numbers (``report.extra['precision']``) and what they mean."""

    layer: str
    weight_absmax: float
    channel_spread: float
    per_tensor_db: float
    per_channel_db: float
    fp16_overflow: int  # values of weight and bias beyond float16's range
    subnormal: int  # nonzero values below float32's (or the target dtype's) smallest normal
    new_subnormal: int = 0  # of those, the ones the fold made subnormal
    values: int = 0  # weights and biases in all
    overflow_channels: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))
    spread_channels: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))
    subnormal_channels: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))
    dead_channels: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))
    subnormal_dtype: str = "float32"
    node: str | None = None
    ranges: torch.Tensor = field(repr=False, default_factory=lambda: torch.zeros(0))  # per output channel
    before: torch.Tensor | None = field(repr=False, default=None)  # the weight before the rewrite
    kind: str = "conv"
    groups: int = 1
    codes: set[str] = field(default_factory=set)  # the findings raised for this layer

    @property
    def before_ranges(self) -> torch.Tensor | None:
        """Per output channel, the largest |weight| before the rewrite (for pictures)."""
        if self.before is None:
            return None
        return per_channel(self.before, self.kind, self.groups).abs().amax(dim=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "weight_absmax": self.weight_absmax,
            "channel_spread": self.channel_spread,
            "int8_sqnr_db": {
                "per_tensor": _finite(self.per_tensor_db),
                "per_channel": _finite(self.per_channel_db),
            },
            "fp16_overflow": self.fp16_overflow,
            "subnormal": self.subnormal,
        }


def _finite(x: float) -> float | None:
    return round(x, 2) if math.isfinite(x) else None


@dataclass
class MeasureItem:
    """One layer waiting to be measured."""

    layer: str
    rows: torch.Tensor  # (out_channels, -1)
    bias: torch.Tensor  # (out_channels,)
    kind: str
    groups: int
    before: tuple[torch.Tensor, torch.Tensor | None] | None
    node: str | None = None


def measure_item(
    layer: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kind: str,
    groups: int,
    before: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    node: str | None = None,
) -> MeasureItem:
    rows = per_channel(weight, kind, groups)
    b = bias.detach().reshape(-1).to(rows.dtype) if bias is not None else rows.new_zeros(rows.shape[0])
    return MeasureItem(layer, rows, b, kind, groups, before, node)


def measure_layer(
    layer: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kind: str,
    groups: int,
    thresholds: PrecisionThresholds | None = None,
    node: str | None = None,
    before: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> LayerPrecision:
    """The numbers of one layer's weights as they will be stored. ``before``: the layer's
    weight and bias before the fold; values already subnormal there are not the fold's doing."""
    return measure_layers([measure_item(layer, weight, bias, kind, groups, before, node)], thresholds)[0]


_CHUNK = 1 << 19  # weights measured together (2 MB of float32): few ops per layer, bounded memory


def measure_layers(
    items: list[MeasureItem], thresholds: PrecisionThresholds | None = None
) -> list[LayerPrecision]:
    """Measure many layers: those of one weight shape together, in a handful of tensor ops (a
    network of 600 layers must not pay 40 small ops per layer), then the rare cases one by one."""
    th = thresholds or PrecisionThresholds()
    out: dict[int, LayerPrecision] = {}
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault((tuple(it.rows.shape), it.rows.dtype), []).append(i)
    for (shape, _dtype), idx in groups.items():
        per_chunk = max(1, _CHUNK // max(1, shape[0] * shape[1]))
        for start in range(0, len(idx), per_chunk):
            chunk = idx[start : start + per_chunk]
            for i, entry in zip(chunk, _measure_stack([items[i] for i in chunk], th)):
                out[i] = entry
    return [out[i] for i in range(len(items))]


def _measure_stack(items: list[MeasureItem], th: PrecisionThresholds) -> list[LayerPrecision]:
    rows = torch.stack([it.rows for it in items])  # (L, C, N): the one copy, plus one work buffer
    b = torch.stack([it.bias for it in items])  # (L, C)
    work = torch.abs(rows)
    ranges = work.amax(dim=2)
    nonzero_min = work.masked_fill_(rows == 0, torch.inf).amin(dim=(1, 2))
    babs = b.abs()
    inf = torch.tensor(torch.inf, dtype=rows.dtype)
    b_nonzero_min = torch.where(b != 0, babs, inf).amin(dim=1)
    r_min = torch.where(ranges > 0, ranges, inf).amin(dim=1)
    r_max, b_max = ranges.amax(dim=1), babs.amax(dim=1)
    dead = (ranges == 0).sum(dim=1)
    signal = torch.mul(rows, rows, out=work).sum(dim=2)  # (L, C)
    noise = []
    for scale in (r_max.unsqueeze(1).expand_as(ranges), ranges):  # per tensor, per channel
        step = scale.clamp_min(1e-38).div(127.0).unsqueeze(-1)
        # |x| <= 127 steps by construction: no clamp
        torch.div(rows, step, out=work).round_().mul_(step).sub_(rows).square_()
        noise.append(work.sum(dim=2))
    del work, rows
    db = torch.log10(
        signal / torch.stack(noise).clamp_min(signal * 10 ** (-_CAP_DB / 10)).clamp_min(1e-300)
    ).mul_(10.0)
    live = signal > 0
    count = live.sum(dim=1)
    means = torch.where(live, db, 0.0).sum(dim=2) / count.clamp_min(1)  # (2, L)
    table = torch.stack(
        [means[0].double(), means[1].double(), count.double(), nonzero_min.double(), b_nonzero_min.double(),
         r_min.double(), r_max.double(), b_max.double(), dead.double()]
    ).T.tolist()  # fmt: skip
    return [_entry(it, ranges[k].clone(), row, th) for k, (it, row) in enumerate(zip(items, table))]


def _entry(
    it: MeasureItem, ranges: torch.Tensor, numbers: list[float], th: PrecisionThresholds
) -> LayerPrecision:
    """One layer's entry from its batched numbers; the rare cases (subnormals, overflow, a wide
    spread, dead channels) look at the layer's own tensors."""
    per_tensor, per_channel_db, count, w_min, bw_min, r_min, r_max, b_max, dead = numbers
    if not count:
        per_tensor = per_channel_db = _CAP_DB
    spread = r_max / r_min if r_min != float("inf") and r_min > 0 else 1.0
    low = th.target_dtype if th.target_dtype in _TINY else torch.float32
    tiny = _TINY[low]
    rows, b = it.rows, it.bias
    subnormal = new_subnormal = 0
    none = torch.zeros(0, dtype=torch.long)
    sub_channels = overflow = spread_channels = dead_channels = none
    if min(w_min, bw_min) < tiny:
        absw, babs = rows.abs(), b.abs()
        sub_w, sub_b = (absw < tiny) & (absw > 0), (babs < tiny) & (babs > 0)
        subnormal = int(sub_w.sum() + sub_b.sum())
        if it.before is not None:  # only what the fold made subnormal
            a0 = per_channel(it.before[0], it.kind, it.groups).abs()
            if a0.shape == absw.shape:
                sub_w = sub_w & ~((a0 != 0) & (a0 < tiny))
            if it.before[1] is not None and it.before[1].numel() == b.numel():
                b0 = it.before[1].detach().reshape(-1).abs().to(b.dtype)
                sub_b = sub_b & ~((b0 != 0) & (b0 < tiny))
        rows_sub = sub_w.sum(dim=1)
        new_subnormal = int(rows_sub.sum() + sub_b.sum())
        sub_channels = ((rows_sub > 0) | sub_b).nonzero().flatten()
    overflow_count = 0
    if max(r_max, b_max) > FP16_MAX:
        overflow_count = int((rows.abs() > FP16_MAX).sum() + (b.abs() > FP16_MAX).sum())
        overflow = ((ranges > FP16_MAX) | (b.abs() > FP16_MAX)).nonzero().flatten()
    if spread > th.int8_spread:
        spread_channels = ((ranges > 0) & (ranges * th.int8_spread <= r_max)).nonzero().flatten()
    if dead:
        dead_channels = (ranges == 0).nonzero().flatten()
    return LayerPrecision(
        layer=it.layer,
        weight_absmax=r_max if ranges.numel() else 0.0,
        channel_spread=spread,
        per_tensor_db=per_tensor,
        per_channel_db=per_channel_db,
        fp16_overflow=overflow_count,
        subnormal=subnormal,
        values=rows.numel() + b.numel(),
        new_subnormal=new_subnormal,
        overflow_channels=overflow,
        spread_channels=spread_channels,
        subnormal_channels=sub_channels,
        dead_channels=dead_channels,
        subnormal_dtype=str(low).replace("torch.", ""),
        node=it.node,
        ranges=ranges,
        before=it.before[0] if it.before is not None else None,
        kind=it.kind,
        groups=it.groups,
    )


def layer_findings(p: LayerPrecision, thresholds: PrecisionThresholds | None = None) -> list[Diagnostic]:
    """PR001, PR002, PR003, PR005 for one (folded) layer."""
    th = thresholds or PrecisionThresholds()
    out: list[Diagnostic] = []
    if p.fp16_overflow:
        out.append(
            finding(
                "PR001",
                f"{p.layer}: {p.fp16_overflow} folded weight/bias values exceed float16's range "
                f"(|v| > {FP16_MAX:g}; largest weight {p.weight_absmax:.3g}) in output channels "
                f"{_channels(p.overflow_channels)}",
                p.node,
                p.layer,
            )
        )
    gap = p.per_channel_db - p.per_tensor_db
    if p.channel_spread > th.int8_spread and gap >= th.sqnr_gap_db:
        out.append(
            finding(
                "PR002",
                f"{p.layer}: per-channel weight ranges spread {p.channel_spread:.3g}x; per-tensor int8 "
                f"weight SQNR {p.per_tensor_db:.1f} dB vs per-channel {p.per_channel_db:.1f} dB; "
                f"small channels {_channels(p.spread_channels)}",
                p.node,
                p.layer,
            )
        )
    # float32 subnormals slow CPUs down whatever their number; in a 16-bit target dtype a few tiny
    # weights losing digits do not matter, a share of the layer (1 %) does
    share = p.new_subnormal / max(p.values, 1)
    if p.new_subnormal and (p.subnormal_dtype == "float32" or share >= 0.01):
        out.append(
            finding(
                "PR003",
                f"{p.layer}: the fold made {p.new_subnormal} values subnormal in {p.subnormal_dtype} "
                f"(nonzero, below its smallest normal; {p.subnormal} in all) in output channels "
                f"{_channels(p.subnormal_channels)}",
                p.node,
                p.layer,
            )
        )
    if p.dead_channels.numel():
        out.append(
            finding(
                "PR005",
                f"{p.layer}: output channels {_channels(p.dead_channels)} have all-zero folded weights: "
                "each is a constant (its bias)",
                p.node,
                p.layer,
            )
        )
    return out


def batchnorm_scale(module: Any) -> torch.Tensor | None:
    """``gamma / sqrt(running_var + eps)`` of a module with running statistics (float64)."""
    var = getattr(module, "running_var", None)
    if not isinstance(var, torch.Tensor):
        return None
    eps = float(getattr(module, "eps", 1e-5))
    scale = 1.0 / torch.sqrt(var.detach().to(torch.float64) + eps)
    weight = getattr(module, "weight", None)
    return scale * weight.detach().to(torch.float64) if isinstance(weight, torch.Tensor) else scale


def batchnorm_findings(
    path: str, scale: torch.Tensor, thresholds: PrecisionThresholds | None = None, node: str | None = None
) -> list[Diagnostic]:
    """PR004 for an ill-conditioned BatchNorm; PR001 where its own scale overflows the target
    dtype (it cannot run there folded or not)."""
    th = thresholds or PrecisionThresholds()
    out: list[Diagnostic] = []
    big = (scale.abs() > th.ill_conditioned_scale).nonzero().flatten()
    if big.numel():
        out.append(
            finding(
                "PR004",
                f"{path}: ill-conditioned BatchNorm: |gamma| / sqrt(var + eps) up to {float(scale.abs().max()):.3g} "
                f"(threshold {th.ill_conditioned_scale:g}) in channels {_channels(big)}: folding amplifies "
                "rounding there",
                node,
                path,
            )
        )
    limit = DTYPE_MAX.get(th.target_dtype) if th.target_dtype is not None else None
    if limit is not None and bool((scale.abs() > limit).any()):
        where = (scale.abs() > limit).nonzero().flatten()
        out.append(
            finding(
                "PR001",
                f"{path}: the BatchNorm's own scale exceeds {str(th.target_dtype).replace('torch.', '')}'s "
                f"range in channels {_channels(where)}: it cannot run in that dtype, folded or not",
                node,
                path,
            )
        )
    return out


def ill_conditioned(scale: torch.Tensor, thresholds: PrecisionThresholds | None = None) -> str | None:
    """Why a fold of a BatchNorm with this scale may drift from rounding alone (PR004), or None."""
    th = thresholds or PrecisionThresholds()
    big = (scale.abs() > th.ill_conditioned_scale).nonzero().flatten()
    if not big.numel():
        return None
    return (
        f"ill-conditioned BatchNorm (PR004): |gamma| / sqrt(var + eps) up to {float(scale.abs().max()):.3g} "
        f"in channels {_channels(big)}"
    )
