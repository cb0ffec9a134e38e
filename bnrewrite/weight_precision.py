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

from .codes import finding
from .diagnostics import Diagnostic

FP16_MAX = 65504.0
_TINY = {  # smallest normal value: below it (and not zero) a value is subnormal
    torch.float32: 1.1754943508222875e-38,
    torch.float16: 6.103515625e-05,
    torch.bfloat16: 1.1754943508222875e-38,
}
_MAX = {torch.float16: FP16_MAX, torch.bfloat16: 3.3895313892515355e38, torch.float32: 3.4028234663852886e38}
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
    """The weight as ``(out_channels, -1)``: one row per output channel of the layer."""
    w = weight.detach().to(torch.float64)
    if kind == "conv_transpose":  # [in, out/groups, k...] -> [out, in/groups * k...]
        cin, cout_g = w.shape[0], w.shape[1]
        w = w.reshape(groups, cin // groups, cout_g, -1).permute(0, 2, 1, 3).reshape(groups * cout_g, -1)
        return w
    return w.reshape(w.shape[0], -1)


def int8_sqnr_db(rows: torch.Tensor, per_channel_scale: bool) -> float:
    """SQNR (dB) of symmetric int8 quantization of ``rows``, per tensor or per output channel,
    averaged over the output channels (each channel's own signal over its own noise: a small
    channel rounded to a few levels counts as much as a large one; capped at 100 dB)."""
    amax = (
        rows.abs().amax(dim=1, keepdim=True)
        if per_channel_scale
        else rows.abs().max().expand(rows.shape[0], 1)
    )
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = (rows / scale).round().clamp(-127, 127) * scale
    signal, noise = (rows**2).sum(dim=1), ((rows - q) ** 2).sum(dim=1)
    live = signal > 0
    if not bool(live.any()):
        return _CAP_DB
    db = 10.0 * torch.log10(signal[live] / noise[live].clamp_min(signal[live] * 10 ** (-_CAP_DB / 10)))
    return float(db.mean())


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
    before_ranges: torch.Tensor | None = field(repr=False, default=None)  # the same, before the rewrite

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
    th = thresholds or PrecisionThresholds()
    rows = per_channel(weight, kind, groups)
    b = (
        bias.detach().to(torch.float64).reshape(-1)
        if bias is not None
        else torch.zeros(rows.shape[0], dtype=torch.float64)
    )
    ranges = rows.abs().amax(dim=1)
    live = ranges > 0
    spread = float(ranges[live].max() / ranges[live].min()) if bool(live.any()) else 1.0
    overflow = (rows.abs() > FP16_MAX).any(dim=1) | (b.abs() > FP16_MAX)
    low = th.target_dtype if th.target_dtype in _TINY else torch.float32
    tiny = _TINY[low]
    sub_w = (rows != 0) & (rows.abs() < tiny)
    sub_b = (b != 0) & (b.abs() < tiny)
    total = int(sub_w.sum() + sub_b.sum())
    before_ranges = None
    if before is not None:  # only what the fold made subnormal
        w0 = per_channel(before[0], kind, groups)
        before_ranges = w0.abs().amax(dim=1)
        if w0.shape == rows.shape:
            sub_w = sub_w & ~((w0 != 0) & (w0.abs() < tiny))
        if before[1] is not None and before[1].numel() == b.numel():
            b0 = before[1].detach().to(torch.float64).reshape(-1)
            sub_b = sub_b & ~((b0 != 0) & (b0.abs() < tiny))
    sub_w = sub_w.sum(dim=1)
    small = ranges[live].min() if bool(live.any()) else ranges.new_tensor(0.0)
    return LayerPrecision(
        layer=layer,
        weight_absmax=float(ranges.max()) if ranges.numel() else 0.0,
        channel_spread=spread,
        per_tensor_db=int8_sqnr_db(rows, False),
        per_channel_db=int8_sqnr_db(rows, True),
        fp16_overflow=int((rows.abs() > FP16_MAX).sum() + (b.abs() > FP16_MAX).sum()),
        subnormal=total,
        values=rows.numel() + b.numel(),
        new_subnormal=int(sub_w.sum() + sub_b.sum()),
        overflow_channels=overflow.nonzero().flatten(),
        spread_channels=(live & (ranges * th.int8_spread <= ranges.max())).nonzero().flatten()
        if spread > th.int8_spread
        else (ranges == small).nonzero().flatten(),
        subnormal_channels=((sub_w > 0) | sub_b).nonzero().flatten(),
        dead_channels=(~live).nonzero().flatten(),
        subnormal_dtype=str(low).replace("torch.", ""),
        node=node,
        ranges=ranges,
        before_ranges=before_ranges,
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
    limit = _MAX.get(th.target_dtype) if th.target_dtype is not None else None
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


# -- what a fold produced, what a plan would produce ---------------------------------------------
def _layer_kind(module: Any) -> tuple[str, int] | None:
    from torch import nn

    if isinstance(module, nn.modules.conv._ConvNd):
        return ("conv_transpose" if module.transposed else "conv"), module.groups
    if isinstance(module, nn.Linear):
        return "linear", 1
    return None


def _module(root: Any, path: str | None) -> Any:
    if not path:
        return None
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _targets(action_target: str | None) -> list[str]:
    return [t.strip() for t in (action_target or "").split(",") if t.strip()]


class PrecisionReport:
    """Collects layer entries and findings once per layer and per BatchNorm."""

    def __init__(self, thresholds: PrecisionThresholds | None) -> None:
        self.th = thresholds or PrecisionThresholds()
        self.layers: dict[str, LayerPrecision] = {}
        self.findings: list[Diagnostic] = []
        self._bns: set[str] = set()

    def layer(
        self,
        path: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kind: str,
        groups: int,
        before: Any = None,
    ) -> None:
        if path in self.layers or not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            return
        old = (
            (before.weight, before.bias)
            if isinstance(getattr(before, "weight", None), torch.Tensor)
            else None
        )
        entry = measure_layer(path, weight, bias, kind, groups, self.th, before=old)
        self.layers[path] = entry
        self.findings.extend(layer_findings(entry, self.th))

    def batchnorm(self, path: str | None, module: Any, node: str | None = None) -> torch.Tensor | None:
        scale = batchnorm_scale(module)
        if scale is None or not path or path in self._bns:
            return scale
        self._bns.add(path)
        self.findings.extend(batchnorm_findings(path, scale, self.th, node))
        return scale

    def write(self, report: Any) -> None:
        report.extra["precision"] = [e.to_dict() for e in self.layers.values()]
        report.details["precision"] = list(self.layers.values())
        report.diagnostics.extend(self.findings)


def of_fold(original: Any, result: Any, report: Any, thresholds: PrecisionThresholds | None = None) -> None:
    """What the fold produced: every layer an applied fold wrote, every BatchNorm it absorbed."""
    pr = PrecisionReport(thresholds)
    for d in list(report.diagnostics):  # BatchNorms kept for the dtype or undone: their own numbers
        if d.code in ("FD111", "FD207"):
            pr.batchnorm(d.module_path, _module(original, d.module_path), d.node)
    for action in report.actions:
        if not (action.kind.startswith("fold") or action.kind == "merge-branches"):
            continue
        pr.batchnorm(action.module_path, _module(original, action.module_path), action.node)
        for path in _targets(action.target):
            layer = _module(result, path)
            kind = _layer_kind(layer)
            if kind is not None:
                pr.layer(path, layer.weight, layer.bias, *kind, before=_module(original, path))
    pr.write(report)


def of_plan(
    model: Any,
    report: Any,
    steps: list[tuple[str | None, str | None, str, str | None]],
    thresholds: PrecisionThresholds | None = None,
) -> None:
    """What a plan would produce (analyze, ``fold --dry-run``): the folded weights of every
    planned fold into module layers, computed in float64 from the BatchNorm's statistics, and
    PR004 for every BatchNorm. ``steps``: (BatchNorm path, node, verdict, target layers)."""
    pr = PrecisionReport(thresholds)
    for path, node, verdict, target in steps:
        bn = _module(model, path)
        scale = pr.batchnorm(path, bn, node)
        if scale is not None and verdict in ("fold-into-preceding", "fold-into-following"):
            _planned_fold(pr, model, bn, scale, verdict, _targets(target))
    pr.write(report)


def _planned_fold(
    pr: PrecisionReport, model: Any, bn: Any, scale: torch.Tensor, verdict: str, targets: list[str]
) -> None:
    from .passes import fold_math

    mean, beta = getattr(bn, "running_mean", None), getattr(bn, "bias", None)
    shift = (
        -mean.detach().to(torch.float64) * scale
        if isinstance(mean, torch.Tensor)
        else torch.zeros_like(scale)
    )
    if isinstance(beta, torch.Tensor):
        shift = shift + beta.detach().to(torch.float64)
    layers = [(p, _module(model, p)) for p in targets]
    if not layers or any(_layer_kind(m) is None for _, m in layers):
        return
    widths = [getattr(m, "out_channels", getattr(m, "out_features", 0)) for _, m in layers]
    concat = verdict == "fold-into-preceding" and len(layers) > 1 and sum(widths) == len(scale)
    start = 0
    for i, (path, layer) in enumerate(layers):
        kind, groups = _layer_kind(layer)  # type: ignore[misc]
        s, t = scale, shift
        if concat:  # each piece of a concatenation takes its slice
            s, t = scale[start : start + widths[i]], shift[start : start + widths[i]]
            start += widths[i]
        elif verdict == "fold-into-preceding" and i:
            t = None  # a sum: the shift goes into one term only
        try:
            if verdict == "fold-into-preceding":
                w, b = fold_math.into_preceding(kind, layer.weight, layer.bias, groups, s, t)
            else:
                w, b = fold_math.into_following(kind, layer.weight, layer.bias, groups, s, shift)
        except (RuntimeError, ValueError):
            continue
        pr.layer(path, w, b, kind, groups, before=layer)
