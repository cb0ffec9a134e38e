"""Re-estimate BatchNorm running statistics from calibration data, exactly.

Each selected BatchNorm's input is accumulated over all calibration batches as float64 sums of
x and x^2 per channel, so the result is the exact mean and (unbiased) variance over every value
the layer saw: a cumulative average, not an exponential one, and independent of batch order.
During calibration BatchNorms normalize with batch statistics, as in training (what
``torch.optim.swa_utils.update_bn`` does); everything else runs in eval mode (no dropout).

Across processes (``torch.distributed`` initialized, e.g. gloo under ``torchrun``) each rank
feeds its own shard and the sums are all-reduced, which gives exactly the single-process result
over the union of the shards. The input model is not modified: the result is a copy of the
module tree sharing every tensor except the new statistics.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from bnrewrite import progress
from bnrewrite.codes import finding
from bnrewrite.diagnostics import Action, Report
from bnrewrite.editor.edit import shallow_copy
from bnrewrite.errors import BnrewriteError, UsageError
from bnrewrite.fold import RewriteResult
from bnrewrite.runtime import error_reason as _reason
from bnrewrite.select import Selector
from bnrewrite.semantics.norms import norm_with_stats


def copy_tree(model: nn.Module) -> nn.Module:
    """A copy of every module object (so flags and buffers can change), sharing all tensors."""
    new = shallow_copy(model)
    for name, child in model._modules.items():
        if child is not None:
            new._modules[name] = copy_tree(child)
    return new


class _Stats:
    def __init__(self, channels: int, device: torch.device) -> None:
        self.sums = torch.zeros(3, channels, dtype=torch.float64, device=device)  # n, sum, sum of squares
        self.batches = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        self.sums[0] += x.numel() // x.shape[1]
        self.sums[1] += x.sum(dims)
        self.sums[2] += (x * x).sum(dims)
        self.batches += 1


class _NormInputs(TorchFunctionMode):
    """Feeds each batch_norm call's input to the statistics of the module whose running mean it
    updates: the input of the normalization inside the module, whatever else its forward does
    before it (a cast, a pre-op)."""

    def __init__(self, by_buffer: dict[int, _Stats]) -> None:
        super().__init__()
        self.by_buffer = by_buffer

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (F.batch_norm, torch.batch_norm):
            mean = args[1] if len(args) > 1 else kwargs.get("running_mean")
            stats = self.by_buffer.get(id(mean))
            if stats is not None:
                stats.add(args[0] if args else kwargs["input"])
        return func(*args, **kwargs)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    select: str | Iterable[str] | None = None,
    types: Iterable[str | type] | None = None,
    distributed: bool | None = None,
) -> RewriteResult:
    """Re-estimate the running statistics of the selected BatchNorms over ``batches``.

    Each batch is a tensor or a tuple of tensors passed to ``model(*batch)``. ``distributed``
    (default: whether ``torch.distributed`` is initialized) all-reduces the statistics.
    """
    if isinstance(model, torch.export.ExportedProgram) or not isinstance(model, nn.Module):
        raise UsageError(
            "recalibrate needs the model as code (a factory spec or nn.Module), not a .pt2 program"
        )
    selector = Selector.of(select, types)
    result = copy_tree(model)
    report = Report("recalibrate", type(model).__name__)
    stats = _selected_norms(result, selector, report)
    count = _run_batches(result, batches, stats)
    use_dist = _distributed() if distributed is None else distributed
    if use_dist and not _distributed():
        raise UsageError("distributed=True but torch.distributed is not initialized")
    total = _write_statistics(stats, count, use_dist, report)
    report.extra["batches"] = total
    report.extra["distributed"] = use_dist
    return RewriteResult(result, report)


def _selected_norms(
    result: nn.Module, selector: Selector, report: Report
) -> dict[str, tuple[nn.Module, _Stats]]:
    """The norms to recalibrate, each with an accumulator; SW001 for those without statistics."""
    stats: dict[str, tuple[nn.Module, _Stats]] = {}
    for path, m in result.named_modules():
        if not norm_with_stats(m) or not selector.matches(path, type(m).__name__):
            continue
        if not getattr(m, "track_running_stats", True) or m.running_mean is None:
            report.add(
                finding(
                    "SW001",
                    f"{path}: no running statistics to recalibrate (track_running_stats=False)",
                    None,
                    path,
                )
            )
            continue
        stats[path] = (m, _Stats(m.running_mean.numel(), m.running_mean.device))
    if not stats:
        raise BnrewriteError(
            f"no BatchNorm with running statistics matches the selection ({selector.describe()})"
        )
    return stats


def _run_batches(
    result: nn.Module, batches: Iterable[Any], stats: dict[str, tuple[nn.Module, _Stats]]
) -> int:
    """Run every batch with the selected norms in training mode (batch statistics) and the rest
    in eval mode; each norm's accumulator sees the input of its own batch_norm call."""
    modes = {id(m): m.training for m in result.modules()}
    result.eval()
    by_buffer: dict[int, _Stats] = {}
    for m, s in stats.values():
        m._buffers = dict(m._buffers)  # own the buffer dict: new statistics, original untouched
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if m._buffers.get(name) is not None:
                m._buffers[name] = m._buffers[name].clone()
        by_buffer[id(m._buffers["running_mean"])] = s
        m.train()
    count = 0
    try:
        with torch.no_grad(), _NormInputs(by_buffer):
            for batch in progress.track(batches, "calibration batches"):
                args = batch if isinstance(batch, (tuple, list)) else (batch,)
                try:
                    result(*args)
                except Exception as exc:
                    raise BnrewriteError(
                        f"the model failed on calibration batch {count}: {_reason(exc)}"
                    ) from exc
                count += 1
    finally:
        for m in result.modules():
            m.train(modes[id(m)])
    return count


def _write_statistics(
    stats: dict[str, tuple[nn.Module, _Stats]], count: int, use_dist: bool, report: Report
) -> int:
    """Exact mean and unbiased variance from the sums (all-reduced across ranks in one
    collective); returns the number of batches seen in all."""
    flat = torch.cat(
        [s.sums.flatten() for _, s in stats.values()] + [torch.tensor([float(count)], dtype=torch.float64)]
    )
    if use_dist:
        torch.distributed.all_reduce(flat)  # one collective for every layer's sums
    *parts, total_batches = flat.split([*(s.sums.numel() for _, s in stats.values()), 1])
    total = int(total_batches.item())
    for (path, (m, s)), part in zip(stats.items(), parts):
        sums = part.view_as(s.sums)
        n = float(sums[0, 0])
        if n < 2:
            report.add(
                finding("SW001", f"{path}: saw {int(n)} value(s) per channel; need at least 2", None, path)
            )
            continue
        mean = sums[1] / n
        var = (sums[2] - n * mean * mean).clamp_min(0) / (n - 1)
        with torch.no_grad():
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
            if getattr(m, "num_batches_tracked", None) is not None:
                m.num_batches_tracked.fill_(total)
        detail = f"statistics from {int(n)} values per channel over {total} batches"
        report.actions.append(Action("recalibrate", None, path, detail, exact=False))
    return total


def read_batches(path: str, batch_size: int | None = None) -> list[Any]:
    """Calibration batches from a file: a tensor (split along dim 0), a list of batches, or a
    dict holding one under ``inputs``/``batches``/``data``; ``.pt`` (weights_only) or
    ``.safetensors``."""
    from bnrewrite.checkpoint import _archive_kind, _require_file

    p = _require_file(path)
    kind = _archive_kind(p)
    if kind == "safetensors" or p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise BnrewriteError("reading .safetensors needs: pip install 'bnrewrite[safetensors]'") from exc
        obj: Any = dict(load_file(str(p)))
    elif kind in ("torch-zip", "pickle"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise BnrewriteError(
                f"{p}: not readable as tensors (read with weights_only=True): {_reason(exc)}"
            ) from exc
    else:
        raise BnrewriteError(f"{p}: expected a .pt file of tensors or a .safetensors file")
    if isinstance(obj, dict):
        key = next((k for k in ("inputs", "batches", "data") if k in obj), None)
        if key is None:
            raise BnrewriteError(f"{p}: holds a dict without 'inputs', 'batches' or 'data'")
        obj = obj[key]
    if isinstance(obj, torch.Tensor):
        if obj.dim() == 0 or obj.shape[0] == 0:
            raise BnrewriteError(f"{p}: the calibration tensor is empty")
        size = batch_size or min(32, obj.shape[0])
        return list(obj.split(size))
    if (
        isinstance(obj, (list, tuple))
        and obj
        and all(isinstance(b, (torch.Tensor, list, tuple)) for b in obj)
    ):
        return list(obj)
    raise BnrewriteError(f"{p}: expected a tensor or a list of batches, got {type(obj).__name__}")
