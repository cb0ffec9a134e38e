"""The local check of a folded conv/linear layer: the original layer, with the per-channel affines it
absorbed applied before or after it, on the inputs the folded layer received; and, with a target
dtype, whether the fold is as accurate in that dtype as the original (FD111)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from bnrewrite.local_checks import (
    LocalCheck,
    bare_copy,
    channel_view,
    cropped,
    fan_in,
    mismatch,
    output_part,
    sample,
)
from bnrewrite.runtime import own_copies
from bnrewrite.semantics.affine import Absorbed


class LayerCheck(LocalCheck):
    """A folded conv/linear against its original weights and the affines it absorbed."""

    def __init__(
        self,
        label: str,
        new: nn.Module,
        old_params: dict[str, torch.Tensor | None],
        absorbed: list[Absorbed],
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(label)
        self.new = new
        self.dtype = dtype  # a target dtype: the fold must be as accurate there as the original
        self.old_params = old_params  # tensors, or stash.Saved ones read back only for the check
        self.on_disk = any(hasattr(v, "load") for v in old_params.values())
        self.reference = None if self.on_disk else bare_copy(new, old_params)
        self.absorbed = absorbed
        self.axis = 1 if isinstance(new, _ConvNd) else -1
        shifts = [
            float(a.affine.shift.abs().max())
            for a in absorbed
            if not a.before and a.affine.shift is not None and a.affine.shift.numel()
        ]
        self.shift_max = max(shifts, default=0.0)

    def expect(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        extra = bool(args[1:] or kwargs)
        x, index = sample(self.new, args[0], extra)
        if extra:
            args, kwargs = own_copies((args, kwargs))
        x = x.clone()  # the reference layer is the user's class: it gets values of its own
        for a in reversed(self.absorbed):
            if a.before:
                x = self._affine(x, a.affine.scale, a.affine.shift)
        reference = self.reference
        if reference is None:  # inplace=True: the old weights are on disk, for this check only
            loaded = {k: v.load() if hasattr(v, "load") else v for k, v in self.old_params.items()}
            reference = bare_copy(self.new, loaded)
        y = reference(x, *args[1:], **kwargs)
        in_dtype = (
            self._in_dtype(reference, args[0], index, args[1:], kwargs) if self.dtype is not None else None
        )
        del reference
        magnitude: Any = 0.0
        for a in self.absorbed:
            if not a.before:
                y = self._affine(y, a.affine.scale, None)
                magnitude = y.abs().max()  # the scaled value before the shift (cancellation)
                if a.affine.shift is not None:
                    y = y + self._view(a.affine.shift, y)
        return y, index, magnitude, in_dtype

    def check(self, want: Any, out: Any) -> None:
        y, index, magnitude, in_dtype = want
        out = output_part(self.new, out, index)
        problem = mismatch(out, cropped(y, out), magnitude, fan_in(self.new), self.shift_max)
        if problem:
            self.fail(f"the folded layer {problem}")
        elif in_dtype is not None:
            self.fail(in_dtype, "FD111")

    def _in_dtype(
        self,
        reference: nn.Module,
        raw: torch.Tensor,
        index: Any,
        rest: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> str | None:
        """Why the folded layer, run in the target dtype, is more than twice as far from
        float64 as the original layer and its affines run in that dtype; None when it is not."""
        if rest or kwargs:
            return None
        dtype = self.dtype
        assert dtype is not None
        x, _ = sample(self.new, raw, False)

        def run(layer: nn.Module, x: torch.Tensor, kind: torch.dtype, with_affines: bool) -> torch.Tensor:
            params = {
                k: v.to(kind) if isinstance(v, torch.Tensor) else v for k, v in layer._parameters.items()
            }
            module = bare_copy(layer, params)
            x = x.to(kind)
            if with_affines:
                for a in reversed(self.absorbed):
                    if a.before:
                        x = self._in_kind(x, a, kind)
            y = module(x)
            if with_affines:
                for a in self.absorbed:
                    if not a.before:
                        y = self._in_kind(y, a, kind)
            return y.to(torch.float64)

        exact = run(reference, x, torch.float64, True)
        original = run(reference, x, dtype, True)
        folded = cropped(run(self.new, x, dtype, False), exact)
        exact, original = cropped(exact, folded), cropped(original, folded)
        e_orig = float((original - exact).abs().max()) if exact.numel() else 0.0
        e_fold = float((folded - exact).abs().max()) if exact.numel() else 0.0
        floor = float(torch.finfo(dtype).eps) * float(exact.abs().max() if exact.numel() else 0.0)
        name = str(dtype).replace("torch.", "")
        new_nan = e_fold != e_fold and e_orig == e_orig  # (both overflow: the dtype's fault, not the fold's)
        if new_nan or e_fold > 2 * e_orig + floor:
            return (
                f"in {name} the folded layer is {e_fold:.3g} from float64, the original layer and "
                f"BatchNorm {e_orig:.3g} (more than twice)"
            )
        return None

    def _in_kind(self, x: torch.Tensor, a: Absorbed, kind: torch.dtype) -> torch.Tensor:
        """``a``'s map applied to ``x`` with its coefficients in ``kind``."""
        shift = a.affine.shift
        y = x * self._view(a.affine.scale.to(kind), x)
        return y + self._view(shift.to(kind), x) if shift is not None else y

    def _view(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # Not cached: small tensors kept alive between the run's temporaries pin heap pages
        # (measured: +0.2x of the model's size in RSS at 300 blocks).
        return channel_view(t, like, self.axis)

    def _affine(self, x: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        y = x * self._view(s, x)
        return y + self._view(t, x) if t is not None else y
