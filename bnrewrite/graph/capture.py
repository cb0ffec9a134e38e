"""Capture a model as fx graphs, on a ladder that reaches every model that runs.

1. ``symbolic_trace`` of the whole model (fast, needs no inputs; module-call dialect);
2. otherwise ``torch.export`` (non-strict) with the example inputs (ATen dialect: every op maps
   back to its module through ``nn_module_stack`` and the parameter names);
3. otherwise the largest parts either can capture, descending through every module (including
   ``ModuleList``/``ModuleDict``); each part's inputs (args and kwargs) come from forward hooks
   in one eager pass, which also records every module's call count and output shape and the
   model's outputs (:class:`Recording`), so later steps need no further run to know them.
Every part that stayed opaque is recorded with the reason. Capturing never changes the input
model: graphs share its tensors but own their module containers, and every run restores buffers.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import sys
import weakref
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from ..diagnostics import OpaquePart
from ..errors import BnrewriteError
from ..runtime import buffers_restored, error_reason, eval_modes, torch_output_silenced
from .norms import is_norm_module, is_plain_norm_module
from .ops import propagate_shapes, stack_path


@dataclass
class Region:
    """One captured graph and where it sits in the original model."""

    path: str
    gm: fx.GraphModule
    dialect: str
    inputs: tuple[Any, ...] | None = None
    shapes_known: bool = False

    def qualify(self, name: str) -> str:
        """A node name unique across regions."""
        return f"{self.path}/{name}" if self.path else name

    def module_path(self, node: fx.Node) -> str | None:
        """The dotted path, in the original model, of the module this node belongs to."""
        local: str | None = None
        if node.op == "call_module":
            local = str(node.target)
        elif node.op == "get_attr":
            local = str(node.target).rpartition(".")[0]
        else:
            stack = node.meta.get("nn_module_stack")
            if stack:
                local = stack_path(list(stack.values())[-1][0])
            else:  # functional call on stored tensors: the module that owns them
                attrs = [n for n in node.all_input_nodes if n.op == "get_attr"]
                local = str(attrs[-1].target).rpartition(".")[0] if attrs else None
        if local is None:
            return self.path or None
        if self.path and local:
            return f"{self.path}.{local}"
        return self.path or local


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


@dataclass
class Capture:
    """The graphs of a model plus the parts that could not be captured."""

    model: Any
    regions: list[Region]
    opaque: list[OpaquePart] = field(default_factory=list)
    example_inputs: tuple[Any, ...] | None = None
    recording: Recording | None = None
    how: str = "symbolic_trace"  # symbolic_trace | torch.export | parts | program | graph
    leaf_modules: tuple[type | str, ...] = ()
    eager_passes: int = 0  # forward passes of the whole model run to capture it (recordings)

    def __post_init__(self) -> None:
        if self.recording is not None and not self.eager_passes:
            self.eager_passes = 1

    @property
    def dialect(self) -> str:
        return self.regions[0].dialect if self.regions else "module"

    @property
    def whole(self) -> bool:
        """True when the whole model is a single graph."""
        return len(self.regions) == 1 and self.regions[0].path == ""

    def ensure_shapes(self) -> bool:
        """Propagate shapes through every region that has example inputs; True if all did."""
        ok = True
        for region in self.regions:
            if region.shapes_known:
                continue
            if region.dialect == "aten":
                region.shapes_known = True
                continue
            if region.inputs is None:
                ok = False
                continue
            propagate_shapes(region.gm, region.inputs)
            region.shapes_known = True
        return ok


class _Tracer(fx.Tracer):
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

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module whose code could not be traced
                self.failed_in = (self.path_of_module(m), m)
            raise

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
    (``File "x.py", line N, in f``): what :func:`~bnrewrite.graph.ops.source_line` reads. A walk
    of the live frames, not a formatted traceback per node."""
    frames = []
    frame = sys._getframe(2)
    while frame is not None and len(frames) < limit:
        path = frame.f_code.co_filename
        if not path.startswith((_OWN_PACKAGE, _TORCH_PACKAGE)) and not path.startswith("<"):
            frames.append(f'  File "{path}", line {frame.f_lineno}, in {frame.f_code.co_name}')
        frame = frame.f_back
    return "\n".join(reversed(frames))


def _trace(
    module: nn.Module,
    tracer: _Tracer,
    concrete_args: dict[str, Any] | None,
) -> fx.GraphModule:
    tracer.failed_in = None
    try:
        graph = tracer.trace(module, concrete_args=concrete_args)
    except Exception as exc:
        raise TraceFailed(_reason(exc) + tracer.leaf_hint()) from exc
    gm = make_graph_module(tracer.root, graph, type(module).__name__)
    gm.training = module.training  # the root's own flag; submodules are shared as they are
    return gm


class TraceFailed(Exception):
    """symbolic_trace failed; the message is the reason as reported (with a --leaf hint)."""

    is_reason = True


_reason = error_reason  # the module-private name the capture code uses


def _is_aten(gm: fx.GraphModule) -> bool:
    return any(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


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


def normalize_inputs(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    raise BnrewriteError(
        f"example inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}"
    )


def capture(
    model: Any,
    example_inputs: Any = None,
    *,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    record_sources: bool = True,
    check_trace: bool = False,
) -> Capture:
    """Capture ``model`` (nn.Module, GraphModule or ExportedProgram) as one or more fx graphs.

    ``leaf_modules`` are kept as single calls: module classes, class names, or dotted-path globs.

    With ``check_trace`` and example inputs, every traced graph is run against the eager module
    it came from; a graph that disagrees (tracing can silently drop a branch, e.g. around
    ``torch.jit.isinstance``) is treated as untraceable and its children are tried instead.
    """
    inputs = normalize_inputs(example_inputs)
    if isinstance(model, torch.export.ExportedProgram):
        if inputs is None and model.example_inputs is not None:
            args, kwargs = model.example_inputs
            inputs = tuple(args) if not kwargs else None
        gm = model.module()
        region = Region("", gm, "aten", inputs, shapes_known=True)
        return Capture(model, [region], [], inputs, how="program")
    if not isinstance(model, nn.Module):
        raise BnrewriteError(f"expected a torch.nn.Module or ExportedProgram, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        gm = clone_graph_module(model)
        dialect = "aten" if _is_aten(gm) else "module"
        region = Region("", gm, dialect, inputs, shapes_known=dialect == "aten")
        return Capture(model, [region], [], inputs, how="graph")

    leaf_types = tuple(x for x in leaf_modules if isinstance(x, type))
    leaf_paths = {x for x in leaf_modules if isinstance(x, str)}
    tracer = _Tracer(leaf_types, leaf_paths, record_sources)
    cap = _capture_module(model, inputs, tracer, concrete_args, check_trace)
    cap.leaf_modules = tuple(leaf_modules)
    return cap


def _capture_module(
    model: nn.Module,
    inputs: tuple[Any, ...] | None,
    tracer: _Tracer,
    concrete_args: dict[str, Any] | None,
    check_trace: bool,
) -> Capture:
    opaque: list[OpaquePart] = []
    try:
        gm = _trace(model, tracer, concrete_args)
    except Exception as exc:  # not fx-traceable: torch.export, then parts
        opaque.append(OpaquePart("", type(model).__name__, _reason(exc)))
    else:
        rec = record_run(model, inputs) if inputs is not None else None
        problem = _check(model, gm, inputs, rec) if (check_trace and inputs is not None) else None
        if problem is None:
            return Capture(model, [Region("", gm, "module", inputs)], [], inputs, rec)
        opaque.append(OpaquePart("", type(model).__name__, problem))
        gm = None
    if inputs is not None:
        exported = export_region(model, "", inputs, {})
        if isinstance(exported, Region):
            rec = record_run(model, inputs)
            return Capture(model, [exported], [], inputs, rec, how="torch.export")
        opaque[0] = OpaquePart("", type(model).__name__, f"{opaque[0].reason}; torch.export: {exported}")

    # Parts: find the frontier without running, then one eager pass records its inputs.
    plan: list[tuple[str, nn.Module, fx.GraphModule | str]] = []
    for name, child in model.named_children():
        _plan_parts(child, name, tracer, plan)
    keep = {path for path, _m, _g in plan}
    rec = record_run(model, inputs, keep=keep) if inputs is not None else None
    regions: list[Region] = []
    for path, module, traced in plan:
        _capture_part(module, path, traced, tracer, regions, opaque, rec, check_trace)
    return Capture(model, regions, opaque, inputs, rec, how="parts")


def capture_submodule(cap: Capture, path: str) -> Region | None:
    """A fresh graph of the module at ``path`` alone (fx, else torch.export on its inputs from
    another eager pass), for replacing just that module; None when neither captures it."""
    module = cap.model.get_submodule(path) if path else cap.model
    leaf_types = tuple(x for x in cap.leaf_modules if isinstance(x, type))
    leaf_paths = {x for x in cap.leaf_modules if isinstance(x, str)}
    tracer = _Tracer(leaf_types, leaf_paths, True)
    rec = None
    if cap.example_inputs is not None and path:
        rec = record_run(cap.model, cap.example_inputs, keep={path})
        cap.eager_passes += 1
    args, kwargs = rec.inputs.get(path, (None, {})) if rec is not None else (cap.example_inputs, {})
    try:
        gm = _trace(module, tracer, None)
    except Exception:
        gm = None
    if gm is not None:
        if kwargs and args is not None:
            args = _bind_positional(gm, args, kwargs)
        return Region(path, gm, "module", args)
    if args is None:
        return None
    exported = export_region(module, path, args, kwargs)
    return exported if isinstance(exported, Region) else None


def _is_container(m: nn.Module) -> bool:
    """A module that only holds others (ModuleList, ModuleDict, or any without a forward)."""
    return isinstance(m, (nn.ModuleList, nn.ModuleDict)) or type(m).forward is nn.Module.forward


def _plan_parts(
    module: nn.Module, path: str, tracer: _Tracer, plan: list[tuple[str, nn.Module, fx.GraphModule | str]]
) -> None:
    """The frontier: the largest fx-traceable parts, and the untraceable modules above them
    (each with the tracer's reason), in an order where a module comes before its children."""
    if _is_container(module):
        for name, child in module.named_children():
            _plan_parts(child, f"{path}.{name}", tracer, plan)
        return
    if tracer.is_leaf_module(module, path):
        return  # a single layer: nothing to trace inside
    try:
        plan.append((path, module, _trace(module, tracer, None)))
        return
    except Exception as exc:
        plan.append((path, module, _reason(exc)))
    for name, child in module.named_children():
        _plan_parts(child, f"{path}.{name}", tracer, plan)


def _capture_part(
    module: nn.Module,
    path: str,
    traced: fx.GraphModule | str,
    tracer: _Tracer,
    regions: list[Region],
    opaque: list[OpaquePart],
    rec: Recording | None,
    check_trace: bool,
) -> None:
    if any(path.startswith(r.path + ".") for r in regions):
        return  # inside a part already captured whole (by torch.export)
    recorded = rec.inputs.get(path) if rec is not None else None
    args, kwargs = recorded if recorded is not None else (None, {})
    if isinstance(traced, fx.GraphModule):
        if kwargs:  # fx graphs take positional inputs: bind the keywords by name
            args = _bind_positional(traced, args, kwargs)
        problem = _check(module, traced, args, None) if (check_trace and args is not None) else None
        if problem is None:
            regions.append(Region(path, traced, "module", args))
            return
        reason = problem
    else:
        reason = traced
    if args is not None:
        exported = export_region(module, path, args, kwargs)
        if isinstance(exported, Region):
            regions.append(exported)
            opaque[:] = [o for o in opaque if not o.module_path.startswith(path + ".")]
            return
        reason = f"{reason}; torch.export: {exported}"
    elif rec is not None and rec.calls.get(path, 0) == 0:
        reason = f"{reason} (not called on the example inputs)"
    opaque.append(OpaquePart(path, type(module).__name__, reason))


def _bind_positional(
    gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...] | None:
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(args)
    for name in names[len(values) :]:
        key = str(name).lstrip("*")
        if key not in kwargs:
            return None
        values.append(kwargs[key])
    return tuple(values)


def export_region(
    module: nn.Module, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Region | str:
    """``torch.export`` (non-strict) of one module on recorded inputs: a Region, or why not."""
    try:
        with torch_output_silenced(), buffers_restored(module):
            ep = torch.export.export(module, tuple(args), dict(kwargs), strict=False)
        gm = ep.module()
    except Exception as exc:
        return _reason(exc)
    inputs = tuple(args) if not kwargs else None
    return Region(path, gm, "aten", inputs, shapes_known=True)


def _check(
    module: nn.Module, gm: fx.GraphModule, inputs: tuple[Any, ...], rec: Recording | None
) -> str | None:
    """None when the traced graph computes what the eager module computes on ``inputs``
    (the eager outputs come from the recording when there is one)."""
    from torch.utils import _pytree as pytree

    mode: Any = contextlib.nullcontext()
    if rec is not None:
        want = pytree.tree_leaves(rec.outputs)
        mode = eval_modes(module)
    else:
        try:
            with torch.no_grad(), buffers_restored(module):
                want = pytree.tree_leaves(module(*inputs))
        except Exception as exc:
            if not any(m.training for m in module.modules()):
                raise BnrewriteError(f"the model failed on the example inputs: {_reason(exc)}") from exc
            mode = eval_modes(module)  # fails only in training mode: compare both in eval mode
            try:
                with torch.no_grad(), buffers_restored(module), eval_modes(module):
                    want = pytree.tree_leaves(module(*inputs))
            except Exception as exc2:
                raise BnrewriteError(f"the model failed on the example inputs: {_reason(exc2)}") from exc2
    try:
        with torch.no_grad(), buffers_restored(gm), mode:
            got = pytree.tree_leaves(gm(*inputs))
    except Exception as exc:
        return f"traced graph fails where eager execution works ({_reason(exc)})"
    same = len(got) == len(want) and all(
        not isinstance(w, torch.Tensor)
        or (
            isinstance(g, torch.Tensor)
            and g.shape == w.shape
            and torch.allclose(g, w, rtol=1e-4, atol=1e-5, equal_nan=True)
        )
        for g, w in zip(got, want)
    )
    return (
        None if same else "traced graph differs from eager execution (tracing silently took another branch)"
    )


# Tensor accessors that read no values: not consumers.
_NOT_READS = frozenset(
    {"__get__", "size", "dim", "numel", "stride", "is_contiguous", "is_floating_point", "data_ptr",
     "element_size", "__len__", "get_device", "is_complex", "__format__", "__repr__", "zeros_like",
     "ones_like", "empty_like", "full_like", "new_zeros", "new_ones", "new_empty", "new_full"}
)  # fmt: skip
_SHAPE_OF_OTHERS = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})  # read only args[0]


class _Readers(TorchFunctionMode):
    """Counts, in an eager run, the consumers of each module's output (see Recording.readers)."""

    def __init__(self, rec: Recording) -> None:
        super().__init__()
        self.rec = rec
        self.depth = 0
        self.by_depth: dict[int, dict[int, tuple[str, Any]]] = {}  # depth -> id -> (path, weakref)
        self.paused: list[bool] = []  # per open module call: whether this mode was taken off the stack

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
        if id(t) not in at:  # an Identity passes its input on: keep the producer
            at[id(t)] = (path, weakref.ref(t))

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
        if self.by_depth.get(self.depth):  # ops inside a leaf layer read nothing recorded here
            name = getattr(func, "__name__", "")
            if name not in _NOT_READS:
                shape_only = name in _SHAPE_OF_OTHERS
                self.count(args[:1] if shape_only else args, {} if shape_only else kwargs)
        return func(*args, **kwargs)


def record_run(model: nn.Module, inputs: Sequence[Any], *, keep: set[str] | None = None) -> Recording:
    """One eager pass in eval mode: every module's call count and first output shape, the first
    inputs (args and kwargs) of the modules in ``keep``, the consumers of each module's first
    output, and the model's outputs. Modules registered under several paths count every call
    under each of them."""
    rec = Recording()
    handles = []
    keep = keep or set()
    readers = _Readers(rec)
    for path, module in model.named_modules(remove_duplicate=False):
        if not path:
            continue

        leaf = not module._modules

        def pre(
            _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], path: str = path, leaf: bool = leaf
        ) -> None:
            rec.calls[path] += 1
            if path in keep and path not in rec.inputs:
                rec.inputs[path] = (tuple(args), dict(kwargs))
            if args and path not in rec.in_ids:
                rec.in_ids[path] = id(args[0])
            readers.count(args, kwargs)
            readers.depth += 1
            readers.paused.append(leaf and readers.pause())

        def post(_m: nn.Module, args: Any, out: Any, path: str = path, leaf: bool = leaf) -> None:
            if readers.paused and readers.paused.pop():
                readers.resume()
            readers.depth -= 1
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
    try:
        with readers:
            rec.outputs = _run_recording(model, inputs, rec)
    except Exception as exc:
        raise BnrewriteError(f"the model failed on the example inputs: {_reason(exc)}") from exc
    finally:
        while readers.paused:  # a layer that raised never reached its post-hook
            if readers.paused.pop():
                readers.resume()
        for h in handles:
            h.remove()
    return rec


def _run_recording(model: nn.Module, inputs: Sequence[Any], rec: Recording) -> Any:
    # Eval mode: the outputs are what a fold must reproduce, and shapes do not depend on it.
    with torch.no_grad(), buffers_restored(model), eval_modes(model):
        return model(*inputs)
