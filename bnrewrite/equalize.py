"""`bnrewrite.equalize`: cross-layer equalization by analysis, for any model.

Matches: every pair of layers (conv of any dims and groups, depthwise included, transposed conv,
linear) where the first one's output reaches the second one only through positive-homogeneous
ops - ReLU, LeakyReLU, PReLU, max and average pooling (adaptive too), nearest upsampling,
identities and eval dropout, a channel slice of a concatenation, a mean over spatial dims, a
flatten that keeps one value per channel - and nothing else reads it.

Guarantees: for a per-channel scale ``s > 0``, ``f(x / s) = f(x) / s`` for each op between, so
dividing the first layer's output channel (weights and bias) by ``s`` and multiplying the second
layer's matching input weights by ``s`` changes nothing in exact arithmetic. Each ``s`` makes the
two layers' weight ranges for that channel equal (``sqrt(r1 * r2)``, Nagel et al. 2019), iterated
over all pairs until the scales stop moving; a layer read by several layers (the branches of an
Inception block) gets one scale from the largest of their ranges. Computed in float64, written in the layers' dtype,
into a copy of the user's tree (new parameters; the input model is not touched), and proven
against float64 with the example inputs; a result that fails the proof is not returned. On a
model with BatchNorms it equalizes what the fold gives (it folds first). Pairs joined by an op
that is not positive-homogeneous (ReLU6, SiLU, hard-swish, GELU, ...) are listed with the reason.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from bnrewrite import precision_report, weight_precision
from bnrewrite.codes import finding

if TYPE_CHECKING:
    from bnrewrite.fold import RewriteResult
from bnrewrite.capture.capture_model import capture
from bnrewrite.diagnostics import Action, Report
from bnrewrite.equalize_pairs import (
    Pair,
    channels_of,
    find_pairs,
    flatten_ok,
)
from bnrewrite.errors import BnrewriteError
from bnrewrite.semantics.layers import LayerSite

_TOLERANCE = 1e-6  # scales closer to 1 than this: converged
_MAX_ROUNDS = 200


@dataclass
class _Weights:
    """A layer's weights in float64 as (out_channels rows) and its input-channel view."""

    site: LayerSite
    weight: torch.Tensor
    bias: torch.Tensor | None
    pairs: list[Pair] = field(default_factory=list)


def _out_ranges(w: torch.Tensor, kind: str, groups: int) -> torch.Tensor:
    """The largest |weight| of each output channel of the layer."""
    if kind == "conv_transpose":
        cin, cout_g = w.shape[0], w.shape[1]
        return w.reshape(groups, cin // groups, cout_g, -1).abs().amax(dim=(1, 3)).reshape(-1)
    return w.reshape(w.shape[0], -1).abs().amax(dim=1)


def _divide_out(w: torch.Tensor, kind: str, groups: int, s: torch.Tensor) -> None:
    """Divide each output channel's weights by its scale, in place."""
    if kind == "conv_transpose":
        cin, cout_g = w.shape[0], w.shape[1]
        w.view(groups, cin // groups, cout_g, -1).div_(s.reshape(groups, 1, cout_g, 1))
    else:
        w.view(w.shape[0], -1).div_(s.reshape(-1, 1))


def _in_ranges(w: torch.Tensor, kind: str, groups: int) -> torch.Tensor:
    """The largest |weight| that reads each input channel of the layer."""
    if kind == "linear":
        return w.abs().amax(dim=0)
    if kind == "conv_transpose":
        return w.reshape(w.shape[0], -1).abs().amax(dim=1)
    cout, cin_g = w.shape[0], w.shape[1]
    return w.reshape(groups, cout // groups, cin_g, -1).abs().amax(dim=(1, 3)).reshape(-1)


def _multiply_in(w: torch.Tensor, kind: str, groups: int, s: torch.Tensor) -> None:
    """Multiply the weights that read each input channel by its scale, in place."""
    if kind == "linear":
        w.mul_(s.reshape(1, -1))
    elif kind == "conv_transpose":
        w.view(w.shape[0], -1).mul_(s.reshape(-1, 1))
    else:
        cout, cin_g = w.shape[0], w.shape[1]
        w.view(groups, cout // groups, cin_g, -1).mul_(s.reshape(groups, 1, cin_g, 1))


def _float64_weights(pairs: list[Pair]) -> dict[int, _Weights]:
    """A float64 copy of the weights of every layer of ``pairs``, by module."""
    layers: dict[int, _Weights] = {}
    for p in pairs:
        for site in (p.first, p.second):
            if id(site.module) not in layers:
                w = site.weight.detach().to(torch.float64).clone()  # type: ignore[union-attr]
                b = site.bias.detach().to(torch.float64).clone() if site.bias is not None else None
                layers[id(site.module)] = _Weights(site, w, b)
    return layers


def _solve(pairs: list[Pair]) -> dict[int, _Weights]:
    """Scales for every pair, iterated to convergence; returns the new float64 weights by layer."""
    layers = _float64_weights(pairs)
    for p in pairs:
        p.scales = torch.ones(channels_of(p.first), dtype=torch.float64)
    groups = _by_first(pairs)
    for _ in range(_MAX_ROUNDS):
        moved = 0.0
        for group in groups:
            s = _group_scale(layers, group)
            _apply(layers, group, s)
            moved = max(moved, float(s.log().abs().max()) if s.numel() else 0.0)
        if moved < _TOLERANCE:
            break
    return layers


def _scaled(pairs: list[Pair], strength: float) -> dict[int, _Weights]:
    """The layers' float64 weights with every pair's scales raised to ``strength`` (1: the
    solution itself; a power of the scales is as exact, only less equal)."""
    layers = _float64_weights(pairs)
    for group in _by_first(pairs):
        assert group[0].scales is not None
        _apply(layers, group, group[0].scales ** strength, record=False)
    return layers


def _by_first(pairs: list[Pair]) -> list[list[Pair]]:
    """The pairs grouped by their first layer: one scale serves every layer reading it."""
    groups: dict[int, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(id(p.first.module), []).append(p)
    return list(groups.values())


def _group_scale(layers: dict[int, _Weights], group: list[Pair]) -> torch.Tensor:
    """sqrt(r1 / r2) per channel: r1 the first layer's output range, r2 the largest range of
    the weights that read it in any of the second layers."""
    first = group[0].first
    r1 = _out_ranges(layers[id(first.module)].weight, first.kind, first.groups)
    n = r1.numel()
    r2 = torch.stack(
        [
            _in_ranges(layers[id(p.second.module)].weight, p.second.kind, p.second.groups)[
                p.offset : p.offset + n
            ]
            for p in group
        ]
    ).amax(dim=0)
    return torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-300)), torch.ones_like(r1))


def _apply(layers: dict[int, _Weights], group: list[Pair], s: torch.Tensor, *, record: bool = True) -> None:
    """Divide the first layer's output channels by ``s``, multiply every reader's inputs by it."""
    first = group[0].first
    one = layers[id(first.module)]
    _divide_out(one.weight, first.kind, first.groups, s)
    if one.bias is not None:
        one.bias.div_(s)
    for p in group:
        two = layers[id(p.second.module)]
        full = torch.ones(_in_ranges(two.weight, p.second.kind, p.second.groups).numel(), dtype=s.dtype)
        full[p.offset : p.offset + s.numel()] = s
        _multiply_in(two.weight, p.second.kind, p.second.groups, full)
        if record:
            assert p.scales is not None
            if p is group[0]:
                p.scales *= s
            else:
                p.scales = group[0].scales  # one scale for the group


def _strongest_that_helps(
    base: nn.Module, pairs: list[Pair], layers: dict[int, _Weights], inputs: tuple[Any, ...]
) -> tuple[dict[int, _Weights], float, dict[str, float]]:
    """Full equalization, or a weaker one (scales ** 0.5, ** 0.25), or none: the strongest
    whose per-tensor int8 output SQNR on ``inputs`` is no lower than the unequalized model's.
    Equal weight ranges usually help, but the quantization noise of a layer reaches the output
    scaled by what follows it, so this is measured, not assumed."""
    before = int8_output_sqnr(base, inputs)
    numbers = {"before": round(before, 2)}
    for strength in (1.0, 0.5, 0.25):
        trial = layers if strength == 1.0 else _scaled(pairs, strength)
        db = int8_output_sqnr(_preview(base, trial), inputs)
        numbers[f"strength {strength:g}"] = round(db, 2)
        if db >= before:
            return trial, strength, numbers
    return {}, 0.0, numbers


def _write(root: nn.Module, layers: dict[int, _Weights]) -> None:
    """New parameters (in each layer's dtype) in ``root``'s copies of the layers."""
    by_id = {id(m): m for m in root.modules()}
    for key, lw in layers.items():
        module = by_id.get(key)
        if module is None:
            continue
        old_w = module.weight
        module.weight = nn.Parameter(lw.weight.to(old_w.dtype), requires_grad=old_w.requires_grad)
        if lw.bias is not None and module.bias is not None:
            module.bias = nn.Parameter(lw.bias.to(module.bias.dtype), requires_grad=module.bias.requires_grad)


def _precision(
    model: nn.Module, paths: list[str], before: nn.Module | None = None
) -> list[weight_precision.LayerPrecision]:
    pr = precision_report.PrecisionReport(None)
    for path in paths:
        layer = precision_report.module_at_path(model, path)
        kind = precision_report.layer_kind(layer)
        if kind is not None:
            old = precision_report.module_at_path(before, path) if before is not None else None
            pr.layer(path, layer.weight, layer.bias, *kind, before=old)
    pr.measure()
    return list(pr.layers.values())


def mean_per_tensor_db(entries: list[dict[str, Any]]) -> float | None:
    """The mean per-tensor int8 weight SQNR over layers (dB)."""
    values = [e["int8_sqnr_db"]["per_tensor"] for e in entries if e["int8_sqnr_db"]["per_tensor"] is not None]
    return round(sum(values) / len(values), 2) if values else None


def equalize(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    dry_run: bool = False,
    leaf_modules: Any = (),
) -> RewriteResult:
    """Cross-layer equalization of ``model`` (see the module doc): ``(model, report)``.

    The result is (a copy of) the user's own model with new weights; a model with BatchNorms is
    folded first (``bnrewrite.fold``, proven) and the folded model equalized. With example inputs
    the result is proven against a float64 evaluation of the original (``verify``); without, it
    is returned unproven and the report says so. ``dry_run=True`` returns the model given and a
    report of the pairs and scales it would apply. ``report.extra['precision_before']`` and
    ``['precision']``: the equalized layers' numbers before and after."""
    from bnrewrite.fold import RewriteResult, fold
    from bnrewrite.verify import verify

    if not isinstance(model, nn.Module) or isinstance(model, fx.GraphModule):
        raise BnrewriteError("equalize takes an nn.Module (the user's model), not a graph or a program")
    report = Report("equalize", type(model).__name__)
    base = model
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        base, folded = fold(model, example_inputs, leaf_modules=leaf_modules)
        report.actions.extend(folded.actions)
        report.diagnostics.extend(d for d in folded.diagnostics if not d.code.startswith("PR"))
        report.extra["fold_proof"] = folded.extra.get("proof")
    cap = capture(base, example_inputs, leaf_modules=leaf_modules)
    pairs, refused = _all_pairs(cap)
    paths = list(dict.fromkeys(p for x in pairs for p in (x.first.module_path, x.second.module_path) if p))
    first = _precision(base, paths)
    report.extra["precision_before"] = [e.to_dict() for e in first]
    layers = _solve(pairs)
    inputs = cap.example_inputs
    if inputs is not None and pairs:  # never lower the int8 output SQNR on the inputs given
        layers, pairs = _weakened(base, pairs, layers, inputs, report)
    result = copy.copy(base) if dry_run else _own_copy(base, layers)
    if not dry_run:
        _write(result, _rekey(base, result, layers))
    after = _precision(result if not dry_run else _preview(base, layers), paths, before=base)
    report.extra["precision"] = [e.to_dict() for e in after]
    report.details["precision"] = after
    report.extra["int8_weight_sqnr_db"] = {
        "before": mean_per_tensor_db(report.extra["precision_before"]),
        "after": mean_per_tensor_db(report.extra["precision"]),
    }
    _report_pairs(report, pairs, refused)
    if dry_run:
        return RewriteResult(model, report)
    if example_inputs is not None and pairs:
        check = verify(
            model, result, cap.example_inputs if cap.example_inputs is not None else example_inputs
        )
        report.verification = {**check.to_dict(), "summary": check.summary()}
        if not check.passed:
            raise BnrewriteError(f"the equalized model does not verify against float64: {check.summary()}")
    elif pairs:
        report.extra["proof"] = {"passed": None, "note": "no example inputs: the result was not run"}
    return RewriteResult(result, report)


def _all_pairs(cap: Any) -> tuple[list[Pair], list[Any]]:
    """Every pair to equalize, over every region, and every pair refused (EQ201). A layer read by
    several layers whose readers cannot all take the scale gives none."""
    pairs, refused = [], []
    for region in cap.regions:
        found, why = find_pairs(region)
        for group in _by_first(found):
            if all(flatten_ok(p) for p in group):
                pairs.extend(group)
        refused.extend(why)
    return pairs, refused


def _weakened(
    base: nn.Module, pairs: list[Pair], layers: dict[int, _Weights], inputs: Any, report: Report
) -> tuple[dict[int, _Weights], list[Pair]]:
    """The strongest equalization that does not lower the int8 output SQNR (EQ202 otherwise)."""
    layers, strength, numbers = _strongest_that_helps(base, pairs, layers, inputs)
    report.extra["int8_output_sqnr_db"] = numbers
    if strength < 1.0:
        done = f"applied at strength {strength:g} (scales ** {strength:g})" if strength else "not applied"
        tried = ", ".join(f"{k} {v:.1f} dB" for k, v in numbers.items())
        why = f"full equalization would lower the per-tensor int8 output SQNR on the example inputs ({tried})"
        report.diagnostics.append(finding("EQ202", f"<model>: {why}; {done}", None, None))
    return layers, pairs if strength else []


def _report_pairs(report: Report, pairs: list[Pair], refused: list[Any]) -> None:
    """EQ101 (an action and a finding) for every pair equalized, EQ201 for every pair refused."""
    for p in pairs:
        s = p.scales if p.scales is not None else torch.ones(1)
        between = ", ".join(p.between) or "nothing"
        detail = f"channels rescaled by {float(s.min()):.3g}..{float(s.max()):.3g} through {between}"
        path = p.first.module_path
        report.actions.append(
            Action("equalize", path, path, detail, target=p.second.module_path, code="EQ101")
        )
        report.diagnostics.append(finding("EQ101", f"{p.label}: {detail}", p.first.name, path))
    for r in refused:
        report.diagnostics.append(
            finding("EQ201", f"{r.first}: not equalized with the next layer: {r.reason}", None, r.first)
        )


def _own_copy(base: nn.Module, layers: dict[int, _Weights]) -> nn.Module:
    """A copy of the tree in which every module whose weights change is its own object."""
    from bnrewrite.editor.edit import Editor, shallow_copy

    root = shallow_copy(base)
    editor = Editor(root, inplace=False)
    for name, module in base.named_modules():
        if id(module) in layers and name:
            editor.own(name)
    return root


def _rekey(base: nn.Module, result: nn.Module, layers: dict[int, _Weights]) -> dict[int, _Weights]:
    """``layers`` keyed by the result's module objects (same paths as in ``base``)."""
    out = {}
    paths = {id(m): n for n, m in base.named_modules()}
    for key, lw in layers.items():
        path = paths.get(key)
        if path is not None:
            out[id(result.get_submodule(path))] = lw
    return out


def _preview(base: nn.Module, layers: dict[int, _Weights]) -> nn.Module:
    preview = copy.deepcopy(base)
    _write(preview, _rekey(base, preview, layers))
    return preview


def int8_output_sqnr(model: nn.Module, inputs: tuple[Any, ...]) -> float:
    """End-to-end output SQNR (dB) with every conv/linear weight quantized to int8 per tensor
    (activations in float): what per-tensor weight quantization costs this model. Every
    floating-point output leaf counts."""
    from torch.utils import _pytree as pytree

    q = copy.deepcopy(model)
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                w = m.weight
                scale = w.abs().max() / 127.0
                if scale > 0:
                    w.copy_((w / scale).round().clamp(-127, 127) * scale)
        ref, got = model(*inputs), q(*inputs)
    pairs = [
        (r.double(), g.double())
        for r, g in zip(pytree.tree_leaves(ref), pytree.tree_leaves(got))
        if isinstance(r, torch.Tensor) and r.is_floating_point()
    ]
    signal = sum(float((r**2).sum()) for r, _ in pairs)
    noise = sum(float(((g - r) ** 2).sum()) for r, g in pairs)
    if noise != noise or signal != signal:
        return -math.inf
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-300) / noise)
