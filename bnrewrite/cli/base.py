"""The command-line app: options shared by every command, one-line errors, loading, output."""

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
from rich.text import Text

from bnrewrite.errors import BnrewriteError, UsageError

app = typer.Typer(
    name="bnrewrite",
    help="Analyze, fold and rewrite normalization layers of PyTorch models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state: dict[str, Any] = {"debug": False, "imports": [], "auto_import": True}
# No markup anywhere: messages, module paths and model text are printed literally; styles come
# from rich Text objects only (see render.py).
out = Console(soft_wrap=False, width=160, markup=False)
err = Console(stderr=True, markup=False)

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
SelectOpt = Annotated[
    list[str] | None,
    typer.Option("--select", help="Only layers whose dotted path matches this glob (repeatable)."),
]
TypeOpt = Annotated[
    list[str] | None,
    typer.Option("--type", help="Only layers of this kind, e.g. BatchNorm2d, F.batch_norm (repeatable)."),
]
LeafOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--leaf",
        help="Keep this module as one call when tracing: class name or dotted-path glob (repeatable).",
    ),
]


PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot",
        help="Also draw each layer's per-channel weight ranges before and after, log scale, the "
        "channels behind precision findings marked (.svg or .png; needs bnrewrite[plot]).",
    ),
]


def write_plot(report: Any, plot: Path | None, force: bool) -> None:
    """Draw ``--plot`` for the report (its path goes into ``extra['plot']``)."""
    if plot is not None:
        from bnrewrite.plot_ranges import plot_ranges

        report.extra["plot"] = plot_ranges(report, plot, force=force)


def check_plot(plot: Path | None, force: bool) -> None:
    """Fail before any work when ``--plot`` cannot be written."""
    if plot is not None:
        from bnrewrite.plot_ranges import check_plot_path

        check_plot_path(plot, force=force)


def dtype_option(value: str | None, flag: str) -> Any:
    """``fp16``/``bf16`` (or ``float16``/``bfloat16``) as a torch dtype; None stays None."""
    if value is None:
        return None
    from bnrewrite.weight_precision import DTYPES

    dtype = DTYPES.get(value.lower())
    if dtype is None:
        raise UsageError(f"{flag} {value!r}: expected fp16 or bf16")
    return dtype


TargetDtypeOpt = Annotated[
    str | None,
    typer.Option(
        "--target-dtype",
        help="fp16|bf16: the dtype the model will run in. A BatchNorm stays unfolded where folding "
        "would overflow it or make its error worse (FD111); the proof reports both models' errors in it.",
    ),
]
NormAffineOpt = Annotated[
    bool,
    typer.Option(
        "--norm-affine",
        help="Also fold the elementwise affine of every LayerNorm/RMSNorm/GroupNorm/InstanceNorm into "
        "the Linear/conv layers that read it; the norm keeps normalizing without it (FD112).",
    ),
]
KeepBranchesOpt = Annotated[
    bool,
    typer.Option(
        "--keep-branches",
        help="Do not merge parallel linear branches (RepVGG/ACNet/DBB/MobileOne/RepConv blocks) "
        "into one conv; only fold the BatchNorms (FD109 lists what merging does).",
    ),
]
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
            err.print(Text.assemble(("error:", "bold red"), f" {exc}"), highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            if _state["debug"]:
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            err.print(
                Text.assemble(
                    ("error:", "bold red"),
                    f" internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
                ),
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and library warnings.")] = False,
    imports: Annotated[
        list[str] | None,
        typer.Option(
            "--import",
            help="Import this module before loading a .pt2 (it registers a pytree type the program's "
            "inputs/outputs use, e.g. a ModelOutput dataclass); repeatable.",
        ),
    ] = None,
    no_import: Annotated[
        bool,
        typer.Option(
            "--no-import", help="Never import a module named in a .pt2 file to register its pytree types."
        ),
    ] = False,
) -> None:
    _state["debug"] = debug
    _state["imports"] = list(imports or [])
    _state["auto_import"] = not no_import
    if debug:
        import os

        os.environ["BNREWRITE_DEBUG"] = "1"


def _load(model: str, weights: Path | None, trust_pickle: bool, shapes: list[str] | None) -> tuple[Any, Any]:
    from bnrewrite.load import inputs_for, load

    loaded = load(
        model,
        weights=weights,
        trust_pickle=trust_pickle,
        imports=_state["imports"],
        auto_import=_state["auto_import"],
    )
    return loaded, inputs_for(loaded, shapes)


def _emit(report: Any, as_json: bool) -> None:
    from bnrewrite.render import render_report, to_json

    if as_json:
        print(to_json(report.to_dict()))
    else:
        render_report(report, out)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit:
        raise
    sys.exit(0)
