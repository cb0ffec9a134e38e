"""Running a model without side effects: eval modes, restored buffers, quiet torch output, and
one-line reasons for failures. Every part of the pipeline runs models through these."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def error_reason(exc: BaseException) -> str:
    """A one-line reason for a failure: the exception type and its first line (an exception
    that is itself a reason, e.g. a failed trace, gives its message)."""
    if getattr(exc, "is_reason", False):
        return str(exc)
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:300]


class buffers_restored:
    """Context manager: every buffer of the given modules is restored on exit.

    Every buffer is copied, those of torch's own norm layers in an eval-mode run too: any code in
    the forward (a parent's, a hook) can write a tensor it reaches, and the input model must come
    back unchanged."""

    def __init__(self, *modules: nn.Module) -> None:
        self.modules = modules
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> buffers_restored:
        seen: set[int] = set()
        for m in self.modules:
            for b in m.buffers():
                if id(b) not in seen:
                    seen.add(id(b))
                    self.saved.append((b, b.detach().clone()))
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for b, copy in self.saved:
                b.copy_(copy)


@contextlib.contextmanager
def eval_modes(module: nn.Module) -> Iterator[None]:
    """Temporarily put every submodule in eval mode; every flag is restored on exit (set as
    plain attributes where the class keeps ``nn.Module``'s ``__setattr__``: its checks cost a
    few microseconds per module, and a run flips every module twice)."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, _ in flags:
            _set_training(m, False)
        yield
    finally:
        for m, training in flags:
            _set_training(m, training)


def _set_training(m: nn.Module, flag: bool) -> None:
    if type(m).__setattr__ is nn.Module.__setattr__:
        object.__setattr__(m, "training", flag)
    else:
        m.training = flag


def run_quietly(module: nn.Module, fn: Any) -> Any:
    """Run ``fn()`` (which runs ``module``) without side effects on buffers. A model that only
    fails in training mode (BatchNorm on one value per channel) is run in eval mode instead:
    shapes, and the comparison of a trace with its eager module, do not depend on the mode."""
    try:
        with torch.no_grad(), buffers_restored(module):
            return fn()
    except Exception:
        if not any(m.training for m in module.modules()):
            raise
    with torch.no_grad(), buffers_restored(module), eval_modes(module):
        return fn()


@contextlib.contextmanager
def torch_output_silenced() -> Iterator[None]:
    """Keep torch.export/ONNX diagnostics (graph dumps) off the terminal unless BNREWRITE_DEBUG."""
    if os.environ.get("BNREWRITE_DEBUG"):
        yield
        return
    sink = io.StringIO()
    loggers = [
        logging.getLogger(n)
        for n in ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export", "torch._export")
    ]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def own_copies(obj: Any, shared: frozenset[int] = frozenset()) -> Any:
    """``obj`` with every tensor leaf cloned: what the tool still needs after user code ran on
    the originals (an in-place activation, ``x += y``, ``relu_`` write into the values they get).
    Tensors whose ``id`` is in ``shared`` (the model's own parameters and buffers, which the runs
    restore) stay themselves."""
    from torch.utils import _pytree as pytree

    def copy(v: Any) -> Any:
        return v.clone() if isinstance(v, torch.Tensor) and id(v) not in shared else v

    return pytree.tree_map(copy, obj)
