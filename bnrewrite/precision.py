"""Run a model in float64 even where its own code asks for lower precision.

A float64 reference is only a reference if every floating-point value in it is float64. Models
create tensors inside ``forward`` (masks and priors from ``torch.ones(..., dtype=float32)``),
cast with ``.float()``, or keep float32 tensors as plain attributes; a reference run that meets
one of them either fails ("double != float") or silently computes that part in float32.

:class:`Float64Everywhere` is a ``TorchDispatchMode`` that, for the duration of a run:
- makes every op that is asked for a narrower floating dtype (a factory's ``dtype=``, the
  ``_to_copy`` behind ``.float()``/``.to(torch.float32)``, ``sum(dtype=...)``) produce float64;
- upcasts narrower floating tensors that meet a float64 tensor in the same op;
- creates default-dtype tensors (``torch.tensor([1.0])``, ``torch.ones(3)``) as float64.
Integer, boolean and complex tensors are left alone, and explicit bit reinterpretation
(``x.view(torch.int32)``) is not touched: such a model falls back (see ``verify``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

_NARROW = (torch.float32, torch.float16, torch.bfloat16)


def _wide(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dtype in _NARROW:
        return x.to(torch.float64)
    return x


class Float64Everywhere(TorchDispatchMode):
    """Dispatch mode: every floating-point value computed inside it is float64."""

    def __enter__(self) -> Float64Everywhere:
        self._default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.set_default_dtype(self._default)
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if kwargs.get("dtype") in _NARROW:
            kwargs["dtype"] = torch.float64
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if any(t.dtype == torch.float64 for t in tensors) and any(t.dtype in _NARROW for t in tensors):
            args, kwargs = pytree.tree_map(_wide, (args, kwargs))
        return func(*args, **kwargs)
