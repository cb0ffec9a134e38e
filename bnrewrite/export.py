"""Write models: ``.pt2``, ``.onnx``, ``.py`` (+ weights) and state_dicts (``.pt``,
``.safetensors``); graph files (``.json``, ``.graphml``, ``.dot``, ``.svg``) via
:mod:`~bnrewrite.graph_files`.

Every write is atomic: the file is written beside the target under a temporary name and renamed
into place only when complete, so a failure never leaves a partial output. An existing output is
only replaced with ``force=True``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from bnrewrite import structure
from bnrewrite.errors import BnrewriteError, UsageError, VerificationError
from bnrewrite.files import WEIGHT_FORMATS, atomic_path, check_output, format_of
from bnrewrite.graph_files import write_graph
from bnrewrite.runtime import buffers_restored, own_copies, torch_output_silenced
from bnrewrite.runtime import error_reason as _reason
from bnrewrite.semantics.norms import is_batchnorm_module


def _runnable(model: Any) -> nn.Module:
    return model.module() if isinstance(model, torch.export.ExportedProgram) else model


def export_program(
    model: Any, example_inputs: tuple[Any, ...] | None, *, dynamic_batch: bool = False
) -> torch.export.ExportedProgram:
    """``torch.export`` the model (optionally with a dynamic batch dimension)."""
    if example_inputs is None:
        raise BnrewriteError("exporting needs example inputs: pass --input-shape (e.g. 1,3,224,224)")
    module = _runnable(model)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        dynamic_shapes = tuple({0: batch} if isinstance(x, torch.Tensor) else None for x in example_inputs)
    try:
        with buffers_restored(module), torch_output_silenced():
            return torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    except Exception as exc:
        hint = ""
        if "DataDependent" in type(exc).__name__ or "data-dependent" in str(exc):
            hint = (
                " (the model branches on tensor values, which torch.export cannot capture; use the "
                "Python API result, or write the weights with -o OUT.safetensors)"
            )
        raise BnrewriteError(f"torch.export failed: {_reason(exc)}{hint}") from exc


def read_back_in_new_process(path: Path) -> None:
    """Load a written ``.pt2`` in a new interpreter (nothing registered by this process helps
    there); a one-line error says why it cannot be read."""
    code = (
        "import sys\nfrom pathlib import Path\nfrom bnrewrite.errors import BnrewriteError\n"
        "from bnrewrite.load import load_program\n"
        "try:\n    load_program(Path(sys.argv[1]))\n"
        "except BnrewriteError as e:\n    print(e, file=sys.stderr); sys.exit(1)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=os.getcwd(), timeout=600
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise VerificationError(f"the written .pt2 cannot be read back in a new process: {reason}")


def export(
    model: Any,
    path: str | os.PathLike[str],
    example_inputs: tuple[Any, ...] | None = None,
    *,
    fmt: str | None = None,
    force: bool = False,
    dynamic_batch: bool = False,
    check: bool = True,
    roundtrip: bool = False,
) -> dict[str, Any]:
    """Write ``model`` to ``path`` in the format its extension (or ``fmt``) names.

    Returns a small report (format, path, and for ONNX the onnxruntime check result).
    ``roundtrip``: a ``.pt2`` must load back in a fresh Python process (as a user's pipeline
    would load it) before it is moved into place; otherwise nothing is written.
    """
    kind = format_of(path, fmt)
    check_output(path, force=force)
    info: dict[str, Any] = {"format": kind, "path": str(path)}
    if kind == "pt2":
        ep = export_program(model, example_inputs, dynamic_batch=dynamic_batch)
        with atomic_path(path, force=force) as tmp:
            torch.export.save(ep, tmp)
            if roundtrip:
                read_back_in_new_process(tmp)
                info["read_back"] = "loaded in a new process"
    elif kind in WEIGHT_FORMATS:
        write_state_dict(model, path, force=force)
    elif kind == "onnx":
        info.update(
            _export_onnx(model, path, example_inputs, force=force, dynamic_batch=dynamic_batch, check=check)
        )
    elif kind == "py":
        info.update(_export_python(model, Path(path), example_inputs, force=force))
    else:
        write_graph(model, path, fmt=kind, force=force)
    return info


def write_state_dict(model: Any, path: str | os.PathLike[str], *, force: bool = False) -> None:
    """The model's state_dict as ``.pt``/``.pth`` (a checkpoint dict: ``state_dict`` plus the
    ``bnrewrite_structure`` string; loads with weights_only=True) or ``.safetensors`` (structure
    in the metadata), for loading into the same architecture (``--weights``), which gets the
    recorded structure first (absorbed BatchNorms as Identity, added biases)."""
    module = _runnable(model)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    layout = structure.encode(structure.describe(module))
    with atomic_path(path, force=force) as tmp:
        if Path(path).suffix.lower() == ".safetensors":
            try:
                from safetensors.torch import save_file
            except ImportError as exc:
                raise BnrewriteError(
                    "writing .safetensors needs: pip install 'bnrewrite[safetensors]'"
                ) from exc
            save_file({k: v.clone() for k, v in state.items()}, str(tmp), metadata={structure.KEY: layout})
        else:
            torch.save({"state_dict": state, structure.KEY: layout}, tmp)


# -- ONNX ----------------------------------------------------------------------------------------


def _export_onnx(
    model: Any, path: Any, inputs: tuple[Any, ...] | None, *, force: bool, dynamic_batch: bool, check: bool
) -> dict[str, Any]:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise BnrewriteError("ONNX export needs the onnx extra: pip install 'bnrewrite[onnx]'") from exc
    ep = export_program(model, inputs, dynamic_batch=dynamic_batch)
    info: dict[str, Any] = {}
    with atomic_path(path, force=force) as tmp:
        try:
            with torch_output_silenced():
                prog = torch.onnx.export(ep, dynamo=True, verbose=False)
            prog.save(str(tmp))
        except Exception as exc:
            raise BnrewriteError(f"ONNX export failed: {_reason(exc)}") from exc
        if check:
            info["onnxruntime_check"] = check_onnx(tmp, _runnable(model), inputs)
            if info["onnxruntime_check"].get("passed") is False:
                hint = ""
                if any(is_batchnorm_module(m) and m.training for m in _runnable(model).modules()):
                    hint = (
                        " - the model's BatchNorm layers are in training mode (batch statistics, which "
                        "ONNX export does not reproduce): call model.eval() first, or fold with --eval"
                    )
                raise BnrewriteError(f"ONNX output differs from PyTorch: {info['onnxruntime_check']}{hint}")
    return info


def check_onnx(path: Any, model: nn.Module, inputs: tuple[Any, ...] | None) -> dict[str, Any]:
    """Run the ONNX file with onnxruntime (when installed) and compare with PyTorch."""
    try:
        import onnxruntime as ort
    except ImportError:
        return {"passed": None, "note": "onnxruntime not installed; output not checked"}
    assert inputs is not None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(sess.get_inputs(), inputs)}
    got = sess.run(None, feeds)
    with torch.no_grad(), buffers_restored(model):
        want = torch.utils._pytree.tree_leaves(model(*own_copies(inputs)))
    worst = 0.0
    for g, w in zip(got, want):
        worst = max(worst, float((torch.from_numpy(g).double() - w.double()).abs().max()))
    scale = max(float(w.double().abs().max()) for w in want) if want else 1.0
    passed = worst <= 1e-4 * max(scale, 1.0) + 1e-5
    return {"passed": passed, "max_abs_error": worst}


# -- Python source -------------------------------------------------------------------------------


def _flat_graph_module(model: Any, inputs: tuple[Any, ...] | None) -> fx.GraphModule:
    """An ATen graph with flat attribute names and plain (non-pytree) calling convention."""
    ep = export_program(model, inputs)
    gm = ep.module()
    graph = gm.graph
    out = graph.output_node()
    if ep.call_spec.out_spec is not None and ep.call_spec.out_spec.is_leaf():
        (values,) = out.args
        if isinstance(values, (tuple, list)) and len(values) == 1:
            out.args = (values[0],)
    for node in list(graph.nodes):
        if node.op == "call_module" and not node.users:  # export's input guards
            graph.erase_node(node)
    flat = fx.GraphModule(torch.nn.Module(), fx.Graph())
    for node in graph.nodes:
        if node.op == "get_attr":
            value = getattr_path(gm, str(node.target))
            name = str(node.target).replace(".", "_")
            if isinstance(value, nn.Parameter):
                flat.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))
            else:
                flat.register_buffer(name, value)
            node.target = name
    graph._codegen = fx.graph.CodeGen()
    flat.graph = graph
    flat.recompile()
    return flat


def getattr_path(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _export_python(model: Any, path: Path, inputs: tuple[Any, ...] | None, *, force: bool) -> dict[str, Any]:
    if not path.stem.isidentifier():
        raise UsageError(f"{path}: the file name must be a Python identifier to be importable")
    flat = _flat_graph_module(model, inputs)
    weights = path.with_name(path.stem + "_weights.pt")
    check_output(weights, force=force)
    code = flat.graph.python_code(root_module="self")
    body = code.src.strip("\n")
    lines = [
        f'"""Generated by bnrewrite: the rewritten graph of a model. Weights: {weights.name}."""',
        "",
        "import math  # noqa: F401",
        "import operator  # noqa: F401",
        "from pathlib import Path",
        "",
        "import torch",
        "from torch import device, inf, nan  # noqa: F401",
        "",
        "",
        "class Model(torch.nn.Module):",
        "    def __init__(self):",
        "        super().__init__()",
    ]
    for name, p in flat.named_parameters():
        lines.append(
            f"        self.{name} = torch.nn.Parameter(torch.empty({list(p.shape)}, dtype={p.dtype}), requires_grad=False)"
        )
    for name, b in flat.named_buffers():
        lines.append(f"        self.register_buffer({name!r}, torch.empty({list(b.shape)}, dtype={b.dtype}))")
    lines += ["", *("    " + ln if ln else "" for ln in body.splitlines()), ""]
    lines += [
        "",
        "def build(weights=None):",
        '    """The model with its weights (read with weights_only=True)."""',
        "    model = Model()",
        f"    path = weights or Path(__file__).with_name({weights.name!r})",
        "    model.load_state_dict(torch.load(path, map_location='cpu', weights_only=True))",
        "    return model.eval()",
        "",
        "",
        "def example_inputs():",
        f"    return ({', '.join(_input_expr(x) for x in inputs or ())}{',' if inputs and len(inputs) == 1 else ''})",
        "",
    ]
    text = "\n".join(lines)
    with atomic_path(weights, force=force) as tmp_w, atomic_path(path, force=force) as tmp_py:
        torch.save(flat.state_dict(), tmp_w)
        tmp_py.write_text(text)
    return {"weights": str(weights)}


def _input_expr(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"torch.randn({list(x.shape)}, dtype={x.dtype})"
    return repr(x)


# -- graph files ---------------------------------------------------------------------------------
