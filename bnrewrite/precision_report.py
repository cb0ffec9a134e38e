"""What a fold produced, or what a plan would produce, in numbers: every folded layer measured once
(batched, see ``weight_precision.measure_layers``) with its findings PR001-PR005, written into the
report (``extra["precision"]``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from bnrewrite.diagnostics import Diagnostic
from bnrewrite.weight_precision import (
    DTYPE_MAX,
    LayerPrecision,
    MeasureItem,
    PrecisionThresholds,
    batchnorm_findings,
    batchnorm_scale,
    layer_findings,
    measure_item,
    measure_layers,
)


# -- what a fold produced, what a plan would produce ---------------------------------------------
def layer_kind(module: Any) -> tuple[str, int] | None:
    from torch import nn

    if isinstance(module, nn.modules.conv._ConvNd):
        return ("conv_transpose" if module.transposed else "conv"), module.groups
    if isinstance(module, nn.Linear):
        return "linear", 1
    return None


def module_at_path(root: Any, path: str | None) -> Any:
    if not path:
        return None
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def targets_of(action_target: str | None) -> list[str]:
    return [t.strip() for t in (action_target or "").split(",") if t.strip()]


class PrecisionReport:
    """Collects layer entries and findings once per layer and per BatchNorm."""

    def __init__(self, thresholds: PrecisionThresholds | None) -> None:
        self.th = thresholds or PrecisionThresholds()
        self.layers: dict[str, LayerPrecision] = {}
        self.findings: list[Diagnostic] = []
        self._bns: set[str] = set()
        self._queue: dict[str, MeasureItem] = {}
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
        self._queue[path] = measure_item(path, weight, bias, kind, groups, old)

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
        big = DTYPE_MAX.get(self.th.target_dtype, math.inf) if self.th.target_dtype is not None else math.inf
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
        pr.batchnorm(action.module_path, module_at_path(original, action.module_path), action.node)
        for path in targets_of(action.target):
            layer = module_at_path(result, path)
            kind = layer_kind(layer)
            if kind is not None:
                pr.layer(path, layer.weight, layer.bias, *kind, before=module_at_path(original, path))
            elif path in graph_layers:
                site = graph_layers[path]
                pr.layer(path, site.weight, site.bias, site.kind, site.groups)
    pr.write(report)


def _graph_layers(result: Any) -> dict[str, Any]:
    """The conv/linear applications of an ATen graph by module path (weights as stored)."""
    from torch import fx

    if not isinstance(result, fx.GraphModule):
        return {}
    from bnrewrite.semantics.captured import Region
    from bnrewrite.semantics.layers import layer_site

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
        bn = module_at_path(model, path)
        pr.batchnorm(path, bn, node)  # PR004: every BatchNorm, in one pass per width
        if verdict in ("fold-into-preceding", "fold-into-following"):
            scale = batchnorm_scale(bn)
            if scale is not None:
                _planned_fold(pr, model, bn, scale, verdict, targets_of(target))
    pr.write(report)


def _planned_fold(
    pr: PrecisionReport, model: Any, bn: Any, scale: torch.Tensor, verdict: str, targets: list[str]
) -> None:
    from bnrewrite.semantics import fold_math

    layers = [(p, module_at_path(model, p)) for p in targets]
    if not layers or any(layer_kind(m) is None for _, m in layers):
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
        kind, groups = layer_kind(layer)  # type: ignore[misc]
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
