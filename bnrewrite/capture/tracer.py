"""The tracer behind every ``symbolic_trace`` capture: plain norm layers and the user's leaves
kept as single calls, absorbed BatchNorms (``nn.Identity``) traced through, the module whose
code failed remembered for a ``--leaf`` hint, and cheap source lines for diagnostics."""

from __future__ import annotations

import fnmatch
import os
import sys
from typing import Any

import torch
from torch import fx, nn

from bnrewrite.runtime import error_reason
from bnrewrite.semantics.norms import is_norm_module, is_plain_norm_module


class Tracer(fx.Tracer):
    """symbolic_trace's tracer, plus user leaves and norm modules kept as single calls."""

    def __init__(self, leaf_types: tuple[type, ...], leaf_paths: set[str], sources: bool) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_paths = leaf_paths
        self.sources = sources  # fx's own stack traces cost a traceback per node: see create_node
        self.failed_in: tuple[str, nn.Module] | None = None

    def create_node(
        self, kind: str, target: Any, args: Any, kwargs: Any, name: Any = None, type_expr: Any = None
    ) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if self.sources and kind in ("call_module", "call_function", "call_method"):
            node.meta["stack_trace"] = _user_frames()
        return node

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """fx's own lookup, by identity, from a table built once: fx searches every named
        parameter on each access, which costs time quadratic in the model's size."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        params, buffers = self._stored()
        name = params.get(id(attr_val)) if isinstance(attr_val, nn.Parameter) else None
        if name is None and self.proxy_buffer_attributes:
            name = buffers.get(id(attr_val))
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def _stored(self) -> tuple[dict[int, str], dict[int, str]]:
        cached = getattr(self, "_stored_names", None)
        if cached is None or cached[0] is not self.root:
            params: dict[int, str] = {}
            buffers: dict[int, str] = {}
            for n, p in self.root.named_parameters():
                params.setdefault(id(p), n)
            for n, b in self.root.named_buffers():
                buffers.setdefault(id(b), n)
            cached = (self.root, params, buffers)
            self._stored_names = cached
        return cached[1], cached[2]

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(m, nn.Sequential) and not self._installed(m):
            # a view of a container (``self.model[:-1](x)``): a new Sequential of the user's
            # modules, held nowhere in the tree; its modules are recorded under their own paths
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module whose code could not be traced
                self.failed_in = (self.path_of_module(m), m)
            raise

    def _installed(self, m: nn.Module) -> bool:
        try:
            self.path_of_module(m)
        except NameError:
            return False
        return True

    def leaf_hint(self) -> str:
        """Where a ``--leaf`` would help: tracing failed inside a module without norm layers."""
        if self.failed_in is None:
            return ""
        path, m = self.failed_in
        if not path or any(is_norm_module(x) for x in m.modules()):
            return ""
        return f" (inside {path}: --leaf {type(m).__name__} keeps it as one call and may make this part traceable)"

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m) is nn.Identity:  # an absorbed BatchNorm: no node at all
            return False
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if is_plain_norm_module(m):
            return True  # a norm that does more than normalize is traced through
        if self.leaf_paths and (
            type(m).__name__ in self.leaf_paths
            or any(fnmatch.fnmatchcase(module_qualified_name, p) for p in self.leaf_paths)
        ):
            return True
        return super().is_leaf_module(m, module_qualified_name)


_OWN_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_TORCH_PACKAGE = os.path.dirname(torch.__file__) + os.sep


def _user_frames(limit: int = 1) -> str:
    """The innermost frames of the user's code that is being traced, in traceback's format
    (``File "x.py", line N, in f``): what :func:`~bnrewrite.semantics.ops.source_line` reads. A walk
    of the live frames, not a formatted traceback per node."""
    frames = []
    frame = sys._getframe(2)
    while frame is not None and len(frames) < limit:
        code = frame.f_code
        user = _USER_CODE.get(code)
        if user is None:  # classify each code object once: the stacks under a trace are deep
            path = code.co_filename
            user = _USER_CODE[code] = not path.startswith((_OWN_PACKAGE, _TORCH_PACKAGE, "<"))
        if user:
            frames.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}')
        frame = frame.f_back
    return "\n".join(reversed(frames))


_USER_CODE: dict[Any, bool] = {}


def trace_module(
    module: nn.Module,
    tracer: Tracer,
    concrete_args: dict[str, Any] | None,
) -> fx.GraphModule:
    tracer.failed_in = None
    try:
        graph = tracer.trace(module, concrete_args=concrete_args)
    except Exception as exc:
        raise TraceFailed(error_reason(exc) + tracer.leaf_hint()) from exc
    gm = make_graph_module(tracer.root, graph, type(module).__name__)
    gm.training = module.training  # the root's own flag; submodules are shared as they are
    return gm


class TraceFailed(Exception):
    """symbolic_trace failed; the message is the reason as reported (with a --leaf hint)."""

    is_reason = True


def make_graph_module(root: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    """A GraphModule that generates and compiles its Python code on first use, not now.

    A rewrite edits the graph right after capture, so compiling here would be thrown away: the
    lazy module compiles once, after the rewrite (torch's own _LazyGraphModule; plain
    GraphModule where it is unavailable).
    """
    try:
        from torch.fx._lazy_graph_module import _make_graph_module, _use_lazy_graph_module
    except ImportError:  # pragma: no cover - older torch
        return fx.GraphModule(root, graph, name)
    with _use_lazy_graph_module(True):
        return _make_graph_module(root, graph, name)


def _is_aten(gm: fx.GraphModule) -> bool:
    return any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


def compile_now(gm: fx.GraphModule) -> None:
    """Regenerate and compile gm's code now (a lazy GraphModule would wait for its first call,
    and until then its ``forward`` signature is a generic stub that confuses torch.export)."""
    gm.recompile()  # a plain GraphModule compiles here; a lazy one only marks itself stale
    real = getattr(gm, "real_recompile", None)
    if real is not None:
        real()


def clone_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph and containers, sharing gm's tensors (no deepcopy)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = gm.graph._codegen
    new = make_graph_module(gm, graph, type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    new.training = gm.training
    return new
