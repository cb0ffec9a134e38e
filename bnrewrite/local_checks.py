"""Local checks: each applied fold is compared with what it replaced, on the inputs it received.

The proof runs the folded model once. During that run, forward hooks on the modules a fold
changed compute what the original modules would have produced from the same inputs:

- a folded conv/linear: the original layer (old weight and bias) followed (or preceded) by the
  per-channel scale and shift it absorbed;
- the module at a BatchNorm's place (``Identity``, the rest of its forward, a scale-and-shift):
  the original BatchNorm module on the value whose normalization the fold moved upstream;
- a module replaced by its folded graph: the original module on the same inputs.

What the original gives is computed in a pre-hook, from copies of the inputs, before the
result's module runs: user code that writes in place (an ``inplace=True`` activation, ``x += y``)
changes neither what a check compares nor the values the result goes on with. Each comparison
allows for float32 rounding at that layer only, so a fold that drops an activation is caught
however little it moves the final output, and the failing fold is named without bisection. A pre-hook on every module object a fold replaced checks that the edit took
effect: the old object must not run in the result (a block also held in a plain list would).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.utils import _pytree as pytree

from bnrewrite.modules import ChannelAffine
from bnrewrite.runtime import eval_modes, own_copies
from bnrewrite.semantics.affine import Affine

_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
)  # fmt: skip


def bare_copy(module: nn.Module, params: dict[str, torch.Tensor | None] | None = None) -> nn.Module:
    """The module without the hooks the proof puts on it (children and tensors shared), with
    ``params`` in place of its parameters: what a check runs as "the original"."""
    new = copy.copy(module)
    new._parameters = {**module._parameters, **(params or {})}
    for name in _HOOK_DICTS:
        if name in module.__dict__:
            new.__dict__[name] = type(module.__dict__[name])()
    return new


_MARGIN = 64.0  # rounding steps allowed per sqrt(fan-in), relative to the magnitudes involved


_BUSY: list[bool] = [False]  # True while a check computes what the original gives: no hook fires


def _quiet(hook: Callable[..., None]) -> Callable[..., None]:
    """A hook that does nothing while another check runs original modules (which may share
    children - the user's activation objects - with the result)."""

    def wrapped(*args: Any) -> None:
        if _BUSY[0]:
            return
        _BUSY[0] = True
        try:
            hook(*args)
        finally:
            _BUSY[0] = False

    return wrapped


_SKIP = object()  # no expectation for this call


class LocalCheck:
    """One check, bound to modules of the result tree; ``failure`` says what went wrong.

    ``expect`` runs before the result's module (on the inputs as they arrive) and returns what
    the original gives; ``check`` runs after it and compares. Calls nest (a module called inside
    itself, a checked module inside another), so expectations wait on a stack."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.failure: str | None = None
        self.code = "FD207"  # the code a failure is reported with
        self.ran = False
        self._pending: list[Any] = []

    new: nn.Module  # the module of the result whose calls are checked

    def install(self) -> list[Any]:
        """Put the hooks in place; returns the handles to remove."""
        return [
            self.new.register_forward_pre_hook(_quiet(self._pre), with_kwargs=True),
            self.new.register_forward_hook(_quiet(self._hook), with_kwargs=True),
        ]

    def applies(self, args: tuple[Any, ...], out: Any = None) -> bool:
        """Whether this call is one the check compares (a tensor in, a tensor out)."""
        return (
            bool(args)
            and isinstance(args[0], torch.Tensor)
            and (out is None or isinstance(out, torch.Tensor))
        )

    def _pre(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with torch.no_grad():
            self._pending.append(self.expect(args, kwargs) if self.applies(args) else _SKIP)

    def _hook(self, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        self.ran = True
        want = self._pending.pop() if self._pending else _SKIP
        if want is not _SKIP and self.applies(args, out):
            with torch.no_grad():
                self.check(want, out)

    def expect(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """What the original modules give on these inputs (before the result's module runs)."""
        raise NotImplementedError

    def check(self, want: Any, out: Any) -> None:
        """Compare one call's output with what ``expect`` computed for it."""
        raise NotImplementedError

    def fail(self, why: str, code: str = "FD207") -> None:
        if self.failure is None:
            self.failure = f"{self.label}: {why}"
            self.code = code


def channel_view(t: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[axis] = -1
    return t.to(dtype=like.dtype, device=like.device).reshape(shape)


def _affine(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None, axis: int) -> torch.Tensor:
    y = x * channel_view(s, x, axis)
    return y + channel_view(t, x, axis) if t is not None else y


def _eps(t: torch.Tensor) -> float:
    return float(torch.finfo(t.dtype).eps) if t.is_floating_point() else 0.0


def mismatch(got: Any, want: Any, magnitude: Any, fan_in: int, extra: float = 0.0) -> str | None:
    """Why ``got`` is not ``want`` up to rounding, or None. ``magnitude`` (a number or a 0-d
    tensor) and ``extra``: other sizes the rounding scales with (a value before its shift)."""
    if not isinstance(got, torch.Tensor) or not isinstance(want, torch.Tensor):
        return None if got == want else "the output changed"
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if not got.is_floating_point():
        return None if torch.equal(got, want) else "the output changed"
    w, g = want, got.to(want.dtype)
    if not w.numel():
        return None
    mag = (
        magnitude.to(w.dtype).reshape(()) if isinstance(magnitude, torch.Tensor) else w.new_tensor(magnitude)
    )
    diff, w_max, g_max, magnitude = torch.stack(
        [(g - w).abs().max(), w.abs().max(), g.abs().max(), mag]
    ).tolist()
    if diff != diff or diff == float("inf"):  # NaN/Inf somewhere: compare where the reference is finite
        finite = torch.isfinite(w)
        if not torch.equal(finite, torch.isfinite(g)):
            return "new NaN/Inf values"
        if not bool(finite.any()):
            return None
        g, w = g[finite], w[finite]
        diff, w_max, g_max = torch.stack([(g - w).abs().max(), w.abs().max(), g.abs().max()]).tolist()
    scale = max(w_max, g_max, magnitude if magnitude == magnitude else 0.0) + extra
    tol = _MARGIN * _eps(got) * math.sqrt(max(fan_in, 1)) * scale + 1e-30
    if diff > tol:
        return f"differs by {diff:.3g} (rounding allows {tol:.3g})"
    return None


def run_original(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The original module in eval mode (no statistics updated), as the eager pass ran it."""
    with torch.no_grad(), eval_modes(module):
        return module(*args, **kwargs)


def fan_in(layer: nn.Module) -> int:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return 1
    if isinstance(layer, _ConvNd) and getattr(layer, "transposed", False):
        return int(weight.shape[1] * math.prod(weight.shape[2:]))
    return int(math.prod(weight.shape[1:]))


_SAMPLE_SIDE = 4  # output positions per spatial dim a conv check recomputes (plus its border)
_SAMPLE_ROWS = 16  # rows of a Linear's input a check recomputes


def sample(layer: nn.Module, x: torch.Tensor, extra: bool) -> tuple[torch.Tensor, tuple[slice, ...] | None]:
    """A corner of the layer's input and the index of the part of its output that the corner
    determines exactly (the corner starts at the input's own border, so padding there is the
    real one; None: all of it): the check costs a fixed amount per layer however large the
    activations are."""
    if extra:
        return x, None
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= _SAMPLE_ROWS:
            return x, None
        return rows[:_SAMPLE_ROWS], (slice(0, _SAMPLE_ROWS),)  # of the output's rows
    if not isinstance(layer, _ConvNd) or layer.transposed or isinstance(layer.padding, str):
        return x, None
    if layer.padding_mode == "circular":  # the corner's padding wraps around to the far side
        return x, None
    if not str(getattr(type(layer).forward, "__module__", "")).startswith("torch.nn."):
        return x, None  # its own forward may read the input's size (TensorFlow-style "SAME" padding)
    crop_in, crop_out = (
        [slice(0, 1)] + [slice(None)] * (x.dim() - 1),
        [slice(0, 1)] + [slice(None)] * (x.dim() - 1),
    )
    for i, (k, s, p, d) in enumerate(zip(layer.kernel_size, layer.stride, layer.padding, layer.dilation)):
        axis = x.dim() - len(layer.kernel_size) + i
        reach = d * (k - 1)
        size = _SAMPLE_SIDE * s + reach
        if x.shape[axis] <= size:
            continue
        crop_in[axis] = slice(0, size)
        crop_out[axis] = slice(0, (size - 1 + p - reach) // s + 1)  # outputs reading only the corner
    return x[tuple(crop_in)], tuple(crop_out)


def output_part(layer: nn.Module, out: torch.Tensor, index: tuple[slice, ...] | None) -> torch.Tensor:
    if index is None:
        return out
    if isinstance(layer, nn.Linear):
        return out.reshape(-1, out.shape[-1])[index]
    return out[index]


def cropped(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``y`` cut to ``like``'s shape from the start of every dim (the exact part of a corner)."""
    return y[tuple(slice(0, n) for n in like.shape)] if y.shape != like.shape else y


_ELEMENTWISE = (
    nn.Identity, nn.Sequential, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.PReLU, nn.Softplus,
    nn.Hardtanh, nn.modules.dropout._DropoutNd, ChannelAffine,
)  # fmt: skip


def _corner(t: torch.Tensor) -> torch.Tensor:
    """The first sample and the first positions of every spatial dim (a fixed-size check)."""
    if t.dim() < 3:
        return t
    return t[(slice(0, 1), slice(None), *(slice(0, _SAMPLE_SIDE) for _ in t.shape[2:]))]


class SlotCheck(LocalCheck):
    """The module at a BatchNorm's place against the original BatchNorm module. ``affine``: the
    normalization moved upstream, so the original module sees the value it would have received
    (the input mapped back through the BatchNorm's scale and shift); None: same input."""

    def __init__(
        self,
        label: str,
        new: nn.Module,
        original: nn.Module,
        affine: Affine | None,
        *,
        axis: int = 1,
    ) -> None:
        super().__init__(label)
        self.axis = axis
        self.new = new
        self.original = bare_copy(original)  # without the hooks the proof puts on the old object
        self.affine = affine
        # a per-channel norm followed by elementwise modules: a corner of the tensor decides
        self.elementwise = all(isinstance(m, _ELEMENTWISE) for m in new.modules())

    def _corner_only(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        return self.elementwise and self.axis == 1 and not (args[1:] or kwargs)

    def expect(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        corner = self._corner_only(args, kwargs)
        z = _corner(args[0]) if corner else args[0]
        magnitude = float(z.abs().max()) if z.numel() else 0.0
        if self.affine is not None:
            scale = channel_view(self.affine.scale, z, self.axis)
            shift = channel_view(
                self.affine.shift if self.affine.shift is not None else torch.zeros_like(self.affine.scale),
                z,
                self.axis,
            )
            nonzero = scale != 0
            z = torch.where(nonzero, (z - shift) / torch.where(nonzero, scale, 1), 0)
            magnitude += float(shift.abs().max()) if shift.numel() else 0.0
        else:
            z = z.clone()  # the original module may write its input (an in-place activation)
        want = run_original(self.original, (z, *own_copies(args[1:])), own_copies(kwargs))
        return want, magnitude, corner

    def check(self, want: Any, out: Any) -> None:
        want, magnitude, corner = want
        problem = mismatch(_corner(out) if corner else out, want, magnitude, 1)
        if problem:
            self.fail(f"the module in the BatchNorm's place {problem} (compared with the original module)")


class GraphCheck(LocalCheck):
    """A module replaced by its folded graph against the original module, on the same inputs."""

    def __init__(self, label: str, new: nn.Module, original: nn.Module) -> None:
        super().__init__(label)
        self.new = new
        self.original = bare_copy(original)  # without the hooks the proof puts on the old object

    def applies(self, args: tuple[Any, ...], out: Any = None) -> bool:
        return True  # any inputs and outputs: the original module is run as it was called

    def expect(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return run_original(self.original, *own_copies((args, kwargs)))

    def check(self, want: Any, out: Any) -> None:
        got_leaves, want_leaves = pytree.tree_leaves(out), pytree.tree_leaves(want)
        if len(got_leaves) != len(want_leaves):
            self.fail("the folded graph returns another structure")
            return
        widest = max((fan_in(m) for m in self.original.modules()), default=1)
        for g, w in zip(got_leaves, want_leaves):
            problem = mismatch(g, w, 0.0, widest)
            if problem:
                self.fail(f"the folded graph {problem} (compared with the original module)")
                return


class StillRuns(LocalCheck):
    """The module objects a fold replaced must not run in the result."""

    def __init__(self, label: str, old: list[tuple[str, nn.Module]]) -> None:
        super().__init__(label)
        self.old = old

    def install(self) -> list[Any]:
        return [m.register_forward_pre_hook(_quiet(self._watch(path))) for path, m in self.old]

    def _watch(self, path: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any) -> None:
            self.fail(
                f"the fold did not take effect: the original {path} still runs in the result "
                "(is it also held somewhere the module tree does not show?)"
            )

        return hook
