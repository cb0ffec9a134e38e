"""The eager recording pass: one run of the model that records what every module did.

Per module path: how often it was called, the first call's inputs (for the paths asked for),
output shape and the ids of its first input and output, and how many consumers read its output
(module calls given it, and ops on it in the code that called the module). A fold relies on
these counts ("this BatchNorm runs once", "this conv's output has one reader") as measured, not
as a graph claims. The model runs in eval mode with its buffers restored: nothing changes.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from bnrewrite.errors import BnrewriteError
from bnrewrite.runtime import buffers_restored, error_reason, eval_modes, own_copies
from bnrewrite.semantics.readers import METADATA_NAMES, SHAPE_OF_SECOND_METHODS


@dataclass
class Recording:
    """What one eager pass over the model saw: per module path, how often it was called, the
    first call's inputs (only for the paths asked for) and output shape; and the outputs."""

    calls: Counter[str] = field(default_factory=Counter)
    inputs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)
    out_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    outputs: Any = None  # in eval mode
    in_ids: dict[str, int] = field(default_factory=dict)  # id() of the first call's first input
    out_ids: dict[str, int] = field(default_factory=dict)  # id() of the first call's output
    # How many consumers read the first call's output: module calls given it, and ops on it in
    # the code that called the module (not ops inside those modules). A fold that changes a
    # layer's output is only right when the one consumer the graph shows is the only one.
    readers: Counter[str] = field(default_factory=Counter)
    # Module paths whose own forward code branched on a tensor's value (``if x.mean() > 0:``);
    # "" is the model's forward. torch.export cannot follow such code (data-dependent control
    # flow), so the capture does not try it there. Tensors made from literals do not count.
    value_branches: set[str] = field(default_factory=set)


# Tensor accessors that read no values: not consumers (the shared definition, plus attribute
# reads - ``x.shape``, ``x.ndim`` arrive as ``__get__`` - and printing).
_NOT_READS = METADATA_NAMES | {"__get__", "data_ptr", "__len__", "__format__", "__repr__"}
_SHAPE_OF_OTHERS = SHAPE_OF_SECOND_METHODS | {"type_as"}  # read only args[0]
# Tensors built from Python numbers alone: a branch on one is not counted (export may know its
# value; counting too few branches only means an export is tried that could have been skipped).
_FROM_LITERALS = frozenset(
    {
        "tensor",
        "as_tensor",
        "scalar_tensor",
        "new_tensor",
        "full",
        "zeros",
        "ones",
        "arange",
        "linspace",
        "eye",
    }
)


class _Readers(TorchFunctionMode):
    """Counts, in an eager run, the consumers of each module's output (see Recording.readers)."""

    def __init__(self, rec: Recording) -> None:
        super().__init__()
        self.rec = rec
        self.depth = 0
        self.by_depth: dict[int, dict[int, tuple[str, Any]]] = {}  # depth -> id -> (path, weakref)
        self.paused: list[bool] = []  # per open module call: whether this mode was taken off the stack
        self.paths: list[str] = []  # the module calls open now, innermost last
        self.literals: set[int] = set()  # ids of tensors computed from literals alone

    def pause(self) -> bool:
        """Take this mode off the torch-function stack while a leaf layer runs (the ops inside a
        layer without children read nothing recorded): only if it is on top."""
        if torch._C._len_torch_function_stack() == 0:
            return False
        top = torch._C._pop_torch_function_stack()
        if top is not self:
            torch._C._push_on_torch_function_stack(top)
            return False
        return True

    def resume(self) -> None:
        torch._C._push_on_torch_function_stack(self)

    def produce(self, path: str, t: torch.Tensor) -> None:
        at = self.by_depth.setdefault(self.depth, {})
        entry = at.get(id(t))
        if entry is None or entry[1]() is not t:  # a live entry: an Identity passed it on, keep it
            at[id(t)] = (path, weakref.ref(t))  # (a dead one: the id of a freed tensor, reused)

    def owner(self, t: Any) -> str | None:
        """The module path whose output ``t`` is, when produced at the current depth."""
        entry = self.by_depth.get(self.depth, {}).get(id(t))
        if entry is None or entry[1]() is not t:
            return None
        return entry[0]

    def count(self, args: Any, kwargs: Any) -> None:
        for value in (*args, *kwargs.values()):
            items = value if isinstance(value, (list, tuple)) else (value,)
            for t in items:
                if isinstance(t, torch.Tensor):
                    path = self.owner(t)
                    if path is not None:
                        self.rec.readers[path] += 1

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__bool__" and args and id(args[0]) not in self.literals:
            self.rec.value_branches.add(self.paths[-1] if self.paths else "")
        if self.by_depth.get(self.depth) and name not in _NOT_READS:  # (inside a leaf: nothing here)
            shape_only = name in _SHAPE_OF_OTHERS
            self.count(args[:1] if shape_only else args, {} if shape_only else kwargs)
        out = func(*args, **kwargs)
        if name in _FROM_LITERALS or (self.literals and self._literal_args(args)):
            self.literals.add(id(out))  # (an id reused later only makes a branch go unnoticed)
        return out

    def _literal_args(self, args: Any) -> bool:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        return bool(tensors) and all(id(t) in self.literals for t in tensors)


def record_run(model: nn.Module, inputs: Sequence[Any], *, keep: set[str] | None = None) -> Recording:
    """One eager pass in eval mode: every module's call count and first output shape, the first
    inputs (args and kwargs) of the modules in ``keep``, the consumers of each module's first
    output, and the model's outputs. Modules registered under several paths count every call
    under each of them."""
    rec = Recording()
    readers = _Readers(rec)
    # Eval mode: the outputs are what a fold must reproduce, and shapes do not depend on it.
    with torch.no_grad(), buffers_restored(model), eval_modes(model):
        handles = _install_hooks(model, rec, readers, keep or set())
        try:
            with readers:
                try:
                    rec.outputs = model(*own_copies(inputs))  # the model may write its inputs
                finally:
                    while readers.paused:  # a layer that raised never reached its post-hook
                        if readers.paused.pop():
                            readers.resume()
        except Exception as exc:
            raise BnrewriteError(f"the model failed on the example inputs: {error_reason(exc)}") from exc
        finally:
            for h in handles:
                h.remove()
    return rec


def _install_hooks(model: nn.Module, rec: Recording, readers: _Readers, keep: set[str]) -> list[Any]:
    """A pre- and a post-hook on every module path, filling ``rec`` as the model runs."""
    handles = []
    stored = frozenset(id(t) for t in (*model.parameters(), *model.buffers())) if keep else frozenset()
    for path, module in model.named_modules(remove_duplicate=False):
        if not path:
            continue

        leaf = not module._modules

        def pre(
            _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], path: str = path, leaf: bool = leaf
        ) -> None:
            rec.calls[path] += 1
            if path in keep and path not in rec.inputs:
                with torch._C.DisableTorchFunction():  # a copy of ours is no consumer
                    rec.inputs[path] = own_copies(
                        (tuple(args), dict(kwargs)), stored
                    )  # later code may write them
            if args and path not in rec.in_ids:
                rec.in_ids[path] = id(args[0])
            readers.count(args, kwargs)
            readers.paths.append(path)
            readers.depth += 1
            readers.paused.append(leaf and readers.pause())

        def post(_m: nn.Module, args: Any, out: Any, path: str = path, leaf: bool = leaf) -> None:
            if readers.paused and readers.paused.pop():
                readers.resume()
            readers.depth -= 1
            if readers.paths:
                readers.paths.pop()
            if args and out is args[0] and isinstance(out, torch.Tensor):  # passed on (eval Dropout):
                owner = readers.owner(out)  # its consumer reads the producer's output, not this call
                if owner is not None:
                    rec.readers[owner] -= 1
            if isinstance(out, torch.Tensor) and path not in rec.out_shapes:
                rec.out_shapes[path] = tuple(out.shape)
                rec.out_ids[path] = id(out)
                readers.produce(path, out)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    return handles
