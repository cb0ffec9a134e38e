"""Capture a model as fx graphs, on a ladder that reaches every model that runs.

1. ``symbolic_trace`` of the whole model (fast, needs no inputs; module-call dialect);
2. otherwise ``torch.export`` (non-strict) with the example inputs (ATen dialect: every op maps
   back to its module through ``nn_module_stack`` and the parameter names);
3. otherwise the largest parts either can capture, descending through every module (including
   ``ModuleList``/``ModuleDict``); each part's inputs (args and kwargs) come from forward hooks
   in one eager pass, which also records every module's call count and output shape and the
   model's outputs (:class:`Recording`), so later steps need no further run to know them.
When ``symbolic_trace`` fails, that eager pass runs before step 2: an export it rules out (code
that branches on a tensor value, an output type export cannot flatten) is not attempted, since
a failing ``torch.export`` costs about as much as one that succeeds (:func:`export_blocker`).
Every part that stayed opaque is recorded with the reason. Capturing never changes the input
model: graphs share its tensors but own their module containers, and every run restores buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from bnrewrite.capture.recording import Recording, record_run
from bnrewrite.capture.tracer import Tracer, _is_aten, clone_graph_module
from bnrewrite.capture.tracer import trace_module as _trace
from bnrewrite.capture.views import map_views
from bnrewrite.diagnostics import OpaquePart
from bnrewrite.errors import BnrewriteError
from bnrewrite.runtime import buffers_restored, eval_modes, own_copies, torch_output_silenced
from bnrewrite.runtime import error_reason as _reason
from bnrewrite.semantics.captured import Capture, Region


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
    tracer = Tracer(leaf_types, leaf_paths, record_sources)
    cap = _capture_module(model, inputs, tracer, concrete_args, check_trace)
    cap.leaf_modules = tuple(leaf_modules)
    return cap


def _capture_module(
    model: nn.Module,
    inputs: tuple[Any, ...] | None,
    tracer: Tracer,
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
    # The parts' frontier is found without running; one eager pass records their inputs and
    # what torch.export cannot follow (a failed export costs about as much as a good one).
    plan: list[tuple[str, nn.Module, fx.GraphModule | str]] = []
    for name, child in model.named_children():
        _plan_parts(child, name, tracer, plan)
    keep = {path for path, _m, _g in plan}
    rec = record_run(model, inputs, keep=keep) if inputs is not None else None
    if inputs is not None:
        assert rec is not None
        exported = export_blocker(rec, "") or export_region(model, "", inputs, {})
        if isinstance(exported, Region):
            rec.inputs.clear()  # the parts' inputs are not needed: let them go
            return Capture(model, [exported], [], inputs, rec, how="torch.export")
        opaque[0] = OpaquePart("", type(model).__name__, f"{opaque[0].reason}; torch.export: {exported}")
    regions: list[Region] = []
    for path, module, traced in plan:
        _capture_part(module, path, traced, tracer, regions, opaque, rec, check_trace)
    return Capture(model, regions, opaque, inputs, rec, how="parts")


def record_inputs(cap: Capture, paths: set[str]) -> Recording | None:
    """One eager pass that records the inputs of the modules at ``paths`` (for capturing several
    of them alone, one pass for all)."""
    paths = {p for p in paths if p}
    if cap.example_inputs is None or not paths:
        return None
    cap.eager_passes += 1
    return record_run(cap.model, cap.example_inputs, keep=paths)


def capture_submodule(cap: Capture, path: str, rec: Recording | None = None) -> Region | None:
    """A fresh graph of the module at ``path`` alone (fx, else torch.export on its inputs from
    ``rec`` or another eager pass), for replacing just that module; None when neither captures it."""
    module = cap.model.get_submodule(path) if path else cap.model
    leaf_types = tuple(x for x in cap.leaf_modules if isinstance(x, type))
    leaf_paths = {x for x in cap.leaf_modules if isinstance(x, str)}
    tracer = Tracer(leaf_types, leaf_paths, True)
    if rec is None or path not in rec.inputs:
        rec = record_inputs(cap, {path})
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
    module: nn.Module, path: str, tracer: Tracer, plan: list[tuple[str, nn.Module, fx.GraphModule | str]]
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
    tracer: Tracer,
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
        assert rec is not None
        exported = export_blocker(rec, path) or export_region(module, path, args, kwargs)
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


def export_blocker(rec: Recording, path: str) -> str | None:
    """Why ``torch.export`` of the module at ``path`` must fail, known from the eager run: its
    code branches on a tensor's value, or (the whole model) it returns a type export cannot
    flatten. None when nothing rules it out (export is then tried)."""
    inside = sorted(p for p in rec.value_branches if not path or p == path or p.startswith(path + "."))
    if inside:
        where = ", ".join(p or "<root>" for p in inside[:3])
        return f"the forward of {where} branches on a tensor value (data-dependent control flow, seen in the eager run; not attempted)"
    if not path:
        odd = _unknown_output(rec.outputs)
        if odd is not None:
            return f"the model returns a {odd.__module__}.{odd.__qualname__}, which torch.export cannot flatten (register it as a pytree node; not attempted)"
    return None


def _unknown_output(outputs: Any) -> type | None:
    """The first output type torch.export cannot return (its own rule), or None."""
    from torch.utils import _pytree as pytree

    try:
        from torch._functorch._aot_autograd.utils import KNOWN_TYPES
    except ImportError:  # pragma: no cover - other torch versions: let export decide
        return None
    for leaf in pytree.tree_leaves(outputs):
        if not isinstance(leaf, tuple(KNOWN_TYPES)):
            return type(leaf)
    return None


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
    map_views(gm, module)  # ``model.slice(None, -1, None).0`` -> ``model.0``
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
                want = pytree.tree_leaves(module(*own_copies(inputs)))
        except Exception as exc:
            if not any(m.training for m in module.modules()):
                raise BnrewriteError(f"the model failed on the example inputs: {_reason(exc)}") from exc
            mode = eval_modes(module)  # fails only in training mode: compare both in eval mode
            try:
                with torch.no_grad(), buffers_restored(module), eval_modes(module):
                    want = pytree.tree_leaves(module(*own_copies(inputs)))
            except Exception as exc2:
                raise BnrewriteError(f"the model failed on the example inputs: {_reason(exc2)}") from exc2
    try:
        with torch.no_grad(), buffers_restored(gm), mode:
            got = pytree.tree_leaves(gm(*own_copies(inputs)))
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
