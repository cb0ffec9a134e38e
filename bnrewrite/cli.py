"""The ``bnrewrite`` command line: parse, call the API, render the report.

Every failure is one line on stderr with exit code 2 (usage) or 1 (failure); ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from . import codes
from .diagnostics import Severity
from .errors import BnrewriteError, UsageError

app = typer.Typer(
    name="bnrewrite",
    help="Analyze, fold and rewrite normalization layers of PyTorch models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False}
out = Console(soft_wrap=False, width=160)
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

ModelArg = Annotated[
    str, typer.Argument(help="A .pt2 file, a package.module:factory spec, or a pickled module.")
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option("--weights", "-w", help="state_dict (.pt/.pth/.safetensors) for a factory spec."),
]
ShapeOpt = Annotated[
    list[str] | None,
    typer.Option("--input-shape", "-s", help="Example input shape, e.g. 1,3,224,224 (repeat per input)."),
]
TrustOpt = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow unpickling a whole module (runs code from the file).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema in README).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output file.")]
FormatOpt = Annotated[
    str | None, typer.Option("--format", help="Output format: pt2, onnx, py, json, graphml, dot, svg.")
]


def _quiet() -> None:
    if not _state["debug"]:
        warnings.filterwarnings("ignore")
        logging.getLogger("torch").setLevel(logging.ERROR)
        logging.getLogger("onnxscript").setLevel(logging.ERROR)


def handles_errors(fn: F) -> F:
    """Turn every failure into one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet()
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except BnrewriteError as exc:
            if _state["debug"]:
                raise
            err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            if _state["debug"]:
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            err.print(
                f"[bold red]error:[/] internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and library warnings.")] = False,
) -> None:
    _state["debug"] = debug


def _load(model: str, weights: Path | None, trust_pickle: bool, shapes: list[str] | None) -> tuple[Any, Any]:
    from .io import inputs_for, load

    loaded = load(model, weights=weights, trust_pickle=trust_pickle)
    return loaded, inputs_for(loaded, shapes)


def _emit(report: Any, as_json: bool) -> None:
    from .render import render_report, to_json

    if as_json:
        print(to_json(report.to_dict()))
    else:
        render_report(report, out)


@app.command()
@handles_errors
def analyze(
    model: ModelArg,
    weights: WeightsOpt = None,
    input_shape: ShapeOpt = None,
    as_json: JsonOpt = False,
    fail_on: Annotated[
        str,
        typer.Option(
            "--fail-on", help="Exit 1 when findings at or above this severity exist: error|warning|info."
        ),
    ] = "error",
    trust_pickle: TrustOpt = False,
) -> None:
    """List every norm layer with its fold verdict, and lint for BatchNorm pitfalls."""
    try:
        threshold = Severity(fail_on.lower())
    except ValueError:
        raise UsageError(f"--fail-on {fail_on!r}: expected error, warning or info") from None
    from .analyze import analyze as run

    loaded, inputs = _load(model, weights, trust_pickle, input_shape)
    report = run(loaded.model, inputs, name=loaded.source)
    _emit(report, as_json)
    if report.has_at_least(threshold):
        raise typer.Exit(1)


@app.command()
@handles_errors
def fold(
    model: ModelArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the folded model.")],
    weights: WeightsOpt = None,
    input_shape: ShapeOpt = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Check the result numerically; write nothing if it fails.")
    ] = False,
    eval_mode: Annotated[
        bool, typer.Option("--eval", help="Fold BatchNorms in training mode as if in eval mode.")
    ] = False,
    fmt: FormatOpt = None,
    dynamic_batch: Annotated[
        bool, typer.Option("--dynamic-batch", help="Export with a dynamic batch dimension.")
    ] = False,
    graph: Annotated[
        Path | None, typer.Option("--graph", help="Also write a before/after picture (.svg or .dot).")
    ] = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    trust_pickle: TrustOpt = False,
) -> None:
    """Fold eval-mode BatchNorm into neighbouring conv/linear weights and write the result."""
    from .api import fold_to_file

    loaded, inputs = _load(model, weights, trust_pickle, input_shape)
    report = fold_to_file(
        loaded,
        output,
        inputs,
        verify=verify,
        eval_mode=eval_mode,
        fmt=fmt,
        dynamic_batch=dynamic_batch,
        graph=graph,
        force=force,
    )
    _emit(report, as_json)


@app.command("verify")
@handles_errors
def verify_cmd(
    original: Annotated[str, typer.Argument(help="The original model.")],
    rewritten: Annotated[str, typer.Argument(help="The rewritten model.")],
    input_shape: ShapeOpt = None,
    rtol: Annotated[float | None, typer.Option(help="Relative tolerance (default by dtype).")] = None,
    atol: Annotated[float | None, typer.Option(help="Absolute tolerance (default by dtype).")] = None,
    as_json: JsonOpt = False,
    trust_pickle: TrustOpt = False,
) -> None:
    """Check that REWRITTEN computes what ORIGINAL computes (float64 reference)."""
    from .io import inputs_for, load
    from .render import to_json
    from .verify import verify

    a = load(original, trust_pickle=trust_pickle)
    b = load(rewritten, trust_pickle=trust_pickle)
    inputs = inputs_for(a, input_shape) or inputs_for(b, input_shape)
    if inputs is None:
        raise UsageError("no example inputs: pass --input-shape")
    result = verify(a.model, b.model, inputs, rtol=rtol, atol=atol)
    if as_json:
        print(to_json(result.to_dict()))
    else:
        out.print(result.summary(), highlight=False)
        if result.note:
            out.print(result.note)
    if not result.passed:
        raise typer.Exit(1)


@app.command()
@handles_errors
def export(
    model: ModelArg,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output file (.pt2/.onnx/.py/.json/.graphml/.dot/.svg).")
    ],
    weights: WeightsOpt = None,
    input_shape: ShapeOpt = None,
    fmt: FormatOpt = None,
    dynamic_batch: Annotated[
        bool, typer.Option("--dynamic-batch", help="Export with a dynamic batch dimension.")
    ] = False,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    trust_pickle: TrustOpt = False,
) -> None:
    """Write a model (unchanged) in another format, or its graph."""
    from .export import export as run
    from .render import to_json

    loaded, inputs = _load(model, weights, trust_pickle, input_shape)
    info = run(loaded.model, output, inputs, fmt=fmt, force=force, dynamic_batch=dynamic_batch)
    if as_json:
        print(to_json(info))
    else:
        out.print(f"wrote {info['path']} ({info['format']})", highlight=False)


@app.command()
@handles_errors
def explain(
    code: Annotated[str | None, typer.Argument(help="A code such as BN001; omit to list all.")] = None,
) -> None:
    """Explain a diagnostic code (what it means, why it matters, how to fix it)."""
    if code is None:
        for c in codes.CODES.values():
            out.print(f"{c.id}  {c.severity.value:8} {c.name:24} {c.summary}", highlight=False)
        return
    c = codes.get(code)
    out.print(f"{c.id} ({c.name}, {c.severity.value}): {c.summary}\n\n{c.explanation}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit:
        raise
    sys.exit(0)
