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
    entry = measure_layers([_item("rows", rows, None, "linear", 1)])[0]
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
class _Item:
    """One layer waiting to be measured."""

    layer: str
    rows: torch.Tensor  # (out_channels, -1)
    bias: torch.Tensor  # (out_channels,)
    kind: str
    groups: int
    before: tuple[torch.Tensor, torch.Tensor | None] | None
    node: str | None = None


def _item(
    layer: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kind: str,
    groups: int,
    before: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    node: str | None = None,
) -> _Item:
    rows = per_channel(weight, kind, groups)
    b = bias.detach().reshape(-1).to(rows.dtype) if bias is not None else rows.new_zeros(rows.shape[0])
    return _Item(layer, rows, b, kind, groups, before, node)


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
    return measure_layers([_item(layer, weight, bias, kind, groups, before, node)], thresholds)[0]


_CHUNK = 1 << 19  # weights measured together (2 MB of float32): few ops per layer, bounded memory


def measure_layers(items: list[_Item], thresholds: PrecisionThresholds | None = None) -> list[LayerPrecision]:
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


def _measure_stack(items: list[_Item], th: PrecisionThresholds) -> list[LayerPrecision]:
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


def _entry(it: _Item, ranges: torch.Tensor, numbers: list[float], th: PrecisionThresholds) -> LayerPrecision:
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
        self._queue: dict[str, _Item] = {}
        self._bn_queue: list[tuple[str, Any, str | None]] = []

    def layer(
        self,
        path: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kind: str,
        groups: int,
        before: Any = None,
    ) -> None:
        if path in self._queue or not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            return
        old = (
            (before.weight, before.bias)
            if isinstance(getattr(before, "weight", None), torch.Tensor)
            else None
        )
        self._queue[path] = _item(path, weight, bias, kind, groups, old)

    def batchnorm(self, path: str | None, module: Any, node: str | None = None) -> None:
        """PR004 (and PR001 for the target dtype) for a BatchNorm module, checked with the others
        of its width in one pass (most BatchNorms are fine)."""
        if path and path not in self._bns and isinstance(getattr(module, "running_var", None), torch.Tensor):
            self._bns.add(path)
            self._bn_queue.append((path, module, node))

    def _measure_batchnorms(self) -> None:
        by_width: dict[int, list[tuple[str, Any, str | None]]] = {}
        for entry in self._bn_queue:
            by_width.setdefault(entry[1].running_var.numel(), []).append(entry)
        self._bn_queue.clear()
        limit = self.th.ill_conditioned_scale
        big = _MAX.get(self.th.target_dtype, math.inf) if self.th.target_dtype is not None else math.inf
        for entries in by_width.values():
            var = torch.stack([m.running_var.detach().float() for _, m, _ in entries])
            eps = torch.tensor([float(getattr(m, "eps", 1e-5)) for _, m, _ in entries]).unsqueeze(1)
            gamma = torch.stack(
                [m.weight.detach().float() if isinstance(m.weight, torch.Tensor) else torch.ones_like(m.running_var, dtype=torch.float32) for _, m, _ in entries]
            )  # fmt: skip
            worst = (gamma.abs() / (var.double() + eps.double()).sqrt()).amax(dim=1).tolist()
            for (path, module, node), w in zip(entries, worst):
                if w > limit or w > big or w != w:  # the rare one: its own check, with its channels
                    scale = batchnorm_scale(module)
                    if scale is not None:
                        self.findings.extend(batchnorm_findings(path, scale, self.th, node))

    def measure(self) -> None:
        """Measure every queued layer (together: see :func:`measure_layers`)."""
        self._measure_batchnorms()
        items = list(self._queue.values())
        self._queue.clear()
        for entry in measure_layers(items, self.th):
            self.layers[entry.layer] = entry
            found = layer_findings(entry, self.th)
            entry.codes = {d.code for d in found}
            self.findings.extend(found)

    def write(self, report: Any) -> None:
        self.measure()
        report.extra["precision"] = [e.to_dict() for e in self.layers.values()]
        report.details["precision"] = list(self.layers.values())
        report.diagnostics.extend(self.findings)


def of_fold(
    original: Any,
    result: Any,
    report: Any,
    thresholds: PrecisionThresholds | None = None,
    scales: dict[str, torch.Tensor] | None = None,
) -> None:
    """What the fold produced: every layer an applied fold wrote, every BatchNorm it absorbed.
    ``scales``: BatchNorm scales by module path, where ``original`` holds no modules (a program)."""
    pr = PrecisionReport(thresholds)
    for path, scale in (scales or {}).items():
        if path not in pr._bns:
            pr._bns.add(path)
            pr.findings.extend(batchnorm_findings(path, scale, pr.th))
    graph_layers = _graph_layers(result)  # a graph result (a program's fold): layers by module path
    if scales is None and hasattr(original, "named_modules"):  # every BatchNorm, as analyze checks
        for path, module in original.named_modules():
            if path and isinstance(getattr(module, "running_var", None), torch.Tensor):
                pr.batchnorm(path, module)
    for action in report.actions:
        if not (action.kind.startswith("fold") or action.kind == "merge-branches"):
            continue
        pr.batchnorm(action.module_path, _module(original, action.module_path), action.node)
        for path in _targets(action.target):
            layer = _module(result, path)
            kind = _layer_kind(layer)
            if kind is not None:
                pr.layer(path, layer.weight, layer.bias, *kind, before=_module(original, path))
            elif path in graph_layers:
                site = graph_layers[path]
                pr.layer(path, site.weight, site.bias, site.kind, site.groups)
    pr.write(report)


def _graph_layers(result: Any) -> dict[str, Any]:
    """The conv/linear applications of an ATen graph by module path (weights as stored)."""
    from torch import fx

    if not isinstance(result, fx.GraphModule):
        return {}
    from .graph.captured import Region
    from .graph.layers import layer_site

    region = Region("", result, "aten")
    found: dict[str, Any] = {}
    for node in result.graph.nodes:
        if node.op in ("call_function", "call_module"):
            site = layer_site(region, node)
            if site is not None and site.weight is not None and site.module_path:
                found.setdefault(site.module_path, site)
    return found


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
        pr.batchnorm(path, bn, node)  # PR004: every BatchNorm, in one pass per width
        if verdict in ("fold-into-preceding", "fold-into-following"):
            scale = batchnorm_scale(bn)
            if scale is not None:
                _planned_fold(pr, model, bn, scale, verdict, _targets(target))
    pr.write(report)


def _planned_fold(
    pr: PrecisionReport, model: Any, bn: Any, scale: torch.Tensor, verdict: str, targets: list[str]
) -> None:
    from .passes import fold_math

    layers = [(p, _module(model, p)) for p in targets]
    if not layers or any(_layer_kind(m) is None for _, m in layers):
        return
    mean, beta = getattr(bn, "running_mean", None), getattr(bn, "bias", None)
    shift = (
        -mean.detach().to(torch.float64) * scale
        if isinstance(mean, torch.Tensor)
        else torch.zeros_like(scale)
    )
    if isinstance(beta, torch.Tensor):
        shift = shift + beta.detach().to(torch.float64)
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
