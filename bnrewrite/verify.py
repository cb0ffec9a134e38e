"""Numerical equivalence of a rewrite, judged against a float64 evaluation of the original.

For every input set (the given ones plus random inputs of the same shapes) both models run in
their own precision; the reference is a float64 copy of the original. An output passes when its
error is within ``atol + rtol * max|ref|`` (defaults by dtype) or no worse than twice the
original model's own rounding error. On failure the first diverging node is named, comparing
intermediate values node by node (a folded conv is compared with the BatchNorm it absorbed).
Neither model is modified: buffers are restored after every run.

The float64 reference runs under :class:`~bnrewrite.precision.Float64Everywhere`, so tensors the
model creates or casts inside ``forward`` are float64 too. A model that still cannot run in
float64 is compared in its own dtype against its own outputs; the tolerance then comes from the
original's sensitivity to rounding (its output change when every input moves by one ulp), and
the result says so. Outputs of any structure (dataclasses, dicts, named tuples, nested lists)
are compared leaf by leaf and reported with their paths (``output.logits``, ``output[1]['a']``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from bnrewrite import progress
from bnrewrite.capture.capture_model import capture, normalize_inputs
from bnrewrite.errors import BnrewriteError
from bnrewrite.precision import Float64Everywhere
from bnrewrite.runtime import buffers_restored, own_copies
from bnrewrite.runtime import error_reason as _reason
from bnrewrite.semantics.ops import EQUIV

# dtype -> (rtol, atol), relative to the largest reference magnitude of each output
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-12),
    torch.float32: (1e-4, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (4e-2, 1e-2),
}


@dataclass
class OutputCheck:
    input_set: int
    output: int
    path: str
    shape: list[int]
    dtype: str
    max_abs_error: float
    max_rel_error: float
    original_abs_error: float
    tolerance: float
    passed: bool


@dataclass
class VerifyResult:
    passed: bool
    checks: list[OutputCheck] = field(default_factory=list)
    first_divergence: dict[str, Any] | None = None
    note: str | None = None
    reference: str = "float64"  # or "own dtype" when the model cannot run in float64
    input_sets: int = 0

    def worst(self) -> OutputCheck | None:
        return max(self.checks, key=lambda c: c.max_abs_error, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checks": [asdict(c) for c in self.checks],
            "first_divergence": self.first_divergence,
            "note": self.note,
            "reference": self.reference,
            "input_sets": self.input_sets,
        }

    def summary(self) -> str:
        w = self.worst()
        status = "PASS" if self.passed else "FAIL"
        if w is None:
            return f"{status}: no outputs compared"
        outputs = len({c.path for c in self.checks})
        against = "a float64 reference" if self.reference == "float64" else "the original in its own dtype"
        own = "own error" if self.reference == "float64" else "rounding sensitivity"
        text = (
            f"{status}: {outputs} output(s) on {self.input_sets} input set(s) compared with {against}; "
            f"worst max abs error {w.max_abs_error:.3g} at {w.path} (rel {w.max_rel_error:.3g}, "
            f"tolerance {w.tolerance:.3g}, original model's {own} {w.original_abs_error:.3g})"
        )
        if self.first_divergence:
            text += f"; first diverging node: {self.first_divergence['node']}"
        return text


def _callable(model: Any) -> nn.Module:
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    if isinstance(model, nn.Module):
        return model
    raise BnrewriteError(f"cannot run a {type(model).__name__}")


def _to64(x: Any) -> Any:
    return x.to(torch.float64) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def output_leaves(obj: Any, path: str = "output") -> list[tuple[str, Any]]:
    """Every leaf of a model's output with its path: tensors, and anything else as it is."""
    if isinstance(obj, torch.Tensor):
        return [(path, obj)]
    if isinstance(obj, Mapping):
        return [leaf for k, v in obj.items() for leaf in output_leaves(v, f"{path}[{k!r}]")]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [
            leaf
            for f in dataclasses.fields(obj)
            for leaf in output_leaves(getattr(obj, f.name), f"{path}.{f.name}")
        ]
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # named tuple
        return [leaf for k in obj._fields for leaf in output_leaves(getattr(obj, k), f"{path}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [leaf for i, v in enumerate(obj) for leaf in output_leaves(v, f"{path}[{i}]")]
    return [(path, obj)]


def _run(model: nn.Module, inputs: tuple[Any, ...], *, float64: bool = False) -> list[tuple[str, Any]]:
    inputs = own_copies(inputs)  # a model that writes its inputs leaves them unchanged for the next run
    try:
        with torch.no_grad(), buffers_restored(model):
            if float64:
                with Float64Everywhere():
                    out = model(*inputs)
            else:
                out = model(*inputs)
    except Exception as exc:
        raise BnrewriteError(f"running {type(model).__name__} failed: {_reason(exc)}") from exc
    return output_leaves(out)


def _one_ulp_up(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        torch.nextafter(x, torch.full_like(x, float("inf")))
        if isinstance(x, torch.Tensor) and x.is_floating_point()
        else x
        for x in inputs
    )


def _reference(
    ref: nn.Module | None, orig: nn.Module, xs: tuple[Any, ...], orig_out: list[tuple[str, Any]]
) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]], str | None]:
    """(reference outputs, what the original's own error is measured against, why not float64).

    The float64 run is the reference where it works; otherwise the original's own outputs are,
    and its error is replaced by its sensitivity to rounding (outputs at inputs one ulp up)."""
    problem = None
    if ref is not None:
        try:
            ref_out = _run(ref, tuple(_to64(x) for x in xs), float64=True)
            if [p for p, _ in ref_out] == [p for p, _ in orig_out] and all(
                not isinstance(r, torch.Tensor) or (isinstance(o, torch.Tensor) and r.shape == o.shape)
                for (_, r), (_, o) in zip(ref_out, orig_out)
            ):
                return ref_out, orig_out, None
            problem = "its outputs in float64 differ in structure or shape"
        except BnrewriteError as exc:
            problem = str(exc)
    return orig_out, _run(orig, _one_ulp_up(xs)), problem or "no float64 copy could be made"


def float64_copy(model: nn.Module) -> nn.Module:
    try:
        ref = copy.deepcopy(model)
    except Exception as exc:
        raise BnrewriteError(f"cannot copy the model for a float64 reference: {_reason(exc)}") from exc
    return ref.to(torch.float64)


def random_like(inputs: tuple[Any, ...], seed: int) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            out.append(torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype).to(x.device))
        else:
            out.append(x)
    return tuple(out)


def _compare_set(
    result: VerifyResult,
    i: int,
    ref_out: list[tuple[str, Any]],
    base_out: list[tuple[str, Any]],
    new_out: list[tuple[str, Any]],
    rtol: float | None,
    atol: float | None,
) -> None:
    """Compare one input set's outputs, leaf by leaf; a different structure or shape is an error."""
    if [p for p, _ in new_out] != [p for p, _ in ref_out]:
        raise BnrewriteError(
            f"the models return different output structures: {[p for p, _ in ref_out]} originally, "
            f"{[p for p, _ in new_out]} now"
        )
    for (path, r), (_, o), (_, n) in zip(ref_out, base_out, new_out):
        if not isinstance(r, torch.Tensor):
            continue
        if not isinstance(n, torch.Tensor) or n.shape != r.shape:
            raise BnrewriteError(
                f"{path} has shape {tuple(r.shape)} originally, {getattr(n, 'shape', n)} now"
            )
        check = _compare(i, len(result.checks), path, r, o, n, rtol, atol)
        result.checks.append(check)
        result.passed = result.passed and check.passed


def verify(
    original: Any,
    rewritten: Any,
    inputs: Any = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    random_sets: int = 2,
    eval_mode: bool = False,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> VerifyResult:
    """Check that ``rewritten`` computes what ``original`` computes.

    ``inputs``: one input tuple (or tensor), or a list of tuples; when None, the example
    inputs of an ExportedProgram are used. ``random_sets`` more sets of random inputs with the
    same shapes are checked too. ``eval_mode=True`` compares with the original in eval mode.
    ``dtype`` (e.g. ``torch.float16``): both models run in that dtype (weights and floating
    inputs cast) and each output's error against float64 is reported for both side by side
    (``max_abs_error`` the rewritten, ``original_abs_error`` the original); it passes where the
    rewritten model is within the dtype's tolerance or no more than twice the original's error.
    """
    sets = _input_sets(original, rewritten, inputs)
    sets = sets + [random_like(sets[0], seed + k) for k in range(random_sets)]
    orig = _callable(original)
    if eval_mode and orig.training:
        orig = copy.deepcopy(orig).eval()
    new = _callable(rewritten)
    try:
        ref: nn.Module | None = float64_copy(orig)
    except BnrewriteError:
        ref = None
    run_orig, run_new = (orig, new) if dtype is None else (_in_dtype(orig, dtype), _in_dtype(new, dtype))
    result = VerifyResult(True, input_sets=len(sets))
    for i, xs in enumerate(progress.track(sets, "input sets compared")):
        xs = _cast(xs, dtype) if dtype is not None else xs  # the reference sees the same inputs
        orig_out = _run(run_orig, xs)
        ref_out, base_out, problem = _reference(ref, orig, xs, orig_out)
        if problem is not None and result.reference == "float64":
            result.reference = "own dtype"
            result.note = (
                f"the model cannot run in float64 ({problem}); compared with the original in its own "
                "dtype, tolerance from its sensitivity to one-ulp input changes"
            )
            ref = None
        _compare_set(result, i, ref_out, base_out, _run(run_new, xs), rtol, atol)
    if not result.passed:
        failing = next(c for c in result.checks if not c.passed)
        result.first_divergence, note = localize(orig, new, sets[failing.input_set], rtol, atol)
        result.note = "; ".join(x for x in (result.note, note) if x) or None
    return result


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` with every floating-point parameter and buffer in ``dtype``."""
    try:
        return copy.deepcopy(model).to(dtype)
    except Exception as exc:
        raise BnrewriteError(f"cannot copy the model to run it in {dtype}: {_reason(exc)}") from exc


def _cast(xs: tuple[Any, ...], dtype: torch.dtype) -> tuple[Any, ...]:
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in xs)


def _input_sets(original: Any, rewritten: Any, inputs: Any) -> list[tuple[Any, ...]]:
    if inputs is None:
        for m in (original, rewritten):
            if isinstance(m, torch.export.ExportedProgram) and m.example_inputs is not None:
                args, kwargs = m.example_inputs
                if not kwargs:
                    return [tuple(args)]
        raise BnrewriteError("no inputs to verify with: pass inputs (or --input-shape)")
    if isinstance(inputs, list) and inputs and isinstance(inputs[0], (tuple, list)):
        return [tuple(x) for x in inputs]
    normalized = normalize_inputs(inputs)
    assert normalized is not None
    return [normalized]


def _tolerance(dtype: torch.dtype, rtol: float | None, atol: float | None) -> tuple[float, float]:
    d_rtol, d_atol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
    return (d_rtol if rtol is None else rtol), (d_atol if atol is None else atol)


def _compare(
    i: int,
    j: int,
    path: str,
    ref: torch.Tensor,
    orig: torch.Tensor,
    new: torch.Tensor,
    rtol: float | None,
    atol: float | None,
) -> OutputCheck:
    r = ref.double()
    scale = float(r.abs().max()) if r.numel() else 0.0
    err = float((new.double() - r).abs().max()) if r.numel() else 0.0
    base = float((orig.double() - r).abs().max()) if r.numel() else 0.0
    if not r.is_floating_point():
        err = float((new.double() != r).any())
    rt, at = _tolerance(new.dtype, rtol, atol)
    tol = at + rt * scale
    ok = err == err and (err <= tol or err <= 2 * base)
    return OutputCheck(
        i,
        j,
        path,
        list(r.shape),
        str(new.dtype).replace("torch.", ""),
        err,
        err / scale if scale else err,
        base,
        tol,
        ok,
    )


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and n.op not in ("get_attr", "placeholder"):
            self.values[n.meta.get(EQUIV, n.name)] = out.detach().clone()  # later ops may write it
        return out


def _as_graph(model: nn.Module) -> fx.GraphModule | None:
    cap = capture(model, record_sources=False)
    return cap.regions[0].gm if cap.whole else None


def _absorbed_into(g_orig: fx.GraphModule, new: nn.Module) -> dict[str, str]:
    """Original node -> the original node whose value it has in ``new``: a layer whose
    BatchNorm became ``nn.Identity`` in the folded tree now computes the BatchNorm's output."""
    alias: dict[str, str] = {}
    for node in g_orig.graph.nodes:
        cur = node
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            if user.op != "call_module":
                break
            try:
                absorbed = type(new.get_submodule(str(user.target))) is nn.Identity
            except AttributeError:
                absorbed = False
            if not absorbed:
                break
            cur = user
        if cur is not node:
            alias[node.name] = cur.name
    return alias


def localize(
    orig: nn.Module, new: nn.Module, inputs: tuple[Any, ...], rtol: float | None, atol: float | None
) -> tuple[dict[str, Any] | None, str | None]:
    """The first node (in the rewritten graph's order) whose value leaves the tolerance."""
    try:
        g_ref = _as_graph(float64_copy(orig))
        g_orig = _as_graph(orig)
        g_new = new if isinstance(new, fx.GraphModule) else _as_graph(new)
    except BnrewriteError as exc:
        return None, f"divergence not localized: {exc}"
    if g_ref is None or g_orig is None or g_new is None:
        return None, "divergence not localized: a model could not be traced as one graph"
    recs = []
    runs = ((g_ref, tuple(_to64(x) for x in inputs), True), (g_orig, inputs, False), (g_new, inputs, False))
    for gm, xs, float64 in runs:
        rec = _Recorder(gm)
        try:
            with torch.no_grad(), buffers_restored(gm), Float64Everywhere() if float64 else nullcontext():
                rec.run(*own_copies(xs))
        except Exception as exc:
            return None, f"divergence not localized: {_reason(exc)}"
        recs.append(rec.values)
    ref_v, orig_v, new_v = recs
    alias = _absorbed_into(g_orig, new)
    for node in g_new.graph.nodes:
        key = node.meta.get(EQUIV, node.name)
        ref_key = alias.get(key, key)
        if key not in new_v or ref_key not in ref_v or ref_key not in orig_v:
            continue
        if new_v[key].shape != ref_v[ref_key].shape:
            continue
        check = _compare(0, 0, key, ref_v[ref_key], orig_v[ref_key], new_v[key], rtol, atol)
        if not check.passed:
            return {
                "node": node.name,
                "original_node": ref_key,
                "max_abs_error": check.max_abs_error,
                "tolerance": check.tolerance,
            }, None
    return None, "no single node exceeds the tolerance; the error accumulates over the graph"
