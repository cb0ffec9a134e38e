"""The ``bnrewrite`` command line: parse, call the API, render the report.

Every failure is one line on stderr with exit code 2 (usage) or 1 (failure); ``--debug`` shows
the traceback instead.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from . import codes, progress
from .errors import BnrewriteError, UsageError

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
    from .io import inputs_for, load

    loaded = load(
        model,
        weights=weights,
        trust_pickle=trust_pickle,
        imports=_state["imports"],
        auto_import=_state["auto_import"],
    )
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
    models: Annotated[
        list[str],
        typer.Argument(help="One or more models: .pt2 files, package.module:factory specs, pickled modules."),
    ],
    weights: WeightsOpt = None,
    input_shape: ShapeOpt = None,
    as_json: JsonOpt = False,
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="Output: text (default), json (as --json) or sarif (SARIF 2.1.0)."),
    ] = None,
    fail_on: Annotated[
        str | None,
        typer.Option(
            "--fail-on",
            help="Exit 1 when findings at or above this severity exist: error|warning|info|never "
            "(default: the config's fail-on, else error).",
        ),
    ] = None,
    only_codes: Annotated[
        list[str] | None,
        typer.Option(
            "--only-codes", help="Report only these codes or code prefixes (repeatable, or comma-separated)."
        ),
    ] = None,
    ignore_codes: Annotated[
        list[str] | None,
        typer.Option("--ignore-codes", help="Never report these codes or code prefixes (repeatable)."),
    ] = None,
    per_module_ignore: Annotated[
        list[str] | None,
        typer.Option(
            "--per-module-ignore", help="GLOB:CODE[,CODE]: accept these codes in matching module paths."
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="pyproject.toml to read [tool.bnrewrite] from (default: found upward)."
        ),
    ] = None,
    no_config: Annotated[
        bool, typer.Option("--no-config", help="Ignore any [tool.bnrewrite] table.")
    ] = False,
    trust_pickle: TrustOpt = False,
    select: SelectOpt = None,
    type_: TypeOpt = None,
    leaf: LeafOpt = None,
) -> None:
    """List every norm layer with its fold verdict, and lint for BatchNorm pitfalls.

    Several models give one summary table and one exit code over all of them."""
    from . import __version__
    from .analyze import analyze as run
    from .config import load_config
    from .render import render_report, render_summary, to_json
    from .sarif import to_sarif

    kind = (fmt or ("json" if as_json else "text")).lower()
    if kind not in ("text", "json", "sarif"):
        raise UsageError(f"--format {fmt!r}: expected text, json or sarif")
    lint = load_config(config, search=not no_config).overridden(
        report=only_codes, ignore=ignore_codes, per_module_ignores=per_module_ignore, fail_on=fail_on
    )
    progress.enable(progress.wanted(quiet=kind != "text"))
    outcomes: list[tuple[str, Any, str | None]] = []
    for spec in progress.track(models, "models analyzed") if len(models) > 1 else models:
        try:
            loaded, inputs = _load(spec, weights, trust_pickle, input_shape)
            report = run(
                loaded.model, inputs, name=loaded.source, select=select, types=type_, leaf_modules=leaf or ()
            )
        except BnrewriteError as exc:
            if len(models) == 1:
                raise
            outcomes.append((spec, None, str(exc)))
            continue
        outcomes.append((spec, lint.filter(report), None))
    reports = [r for _, r, _ in outcomes if r is not None]
    if kind == "sarif":
        print(to_json(to_sarif(reports, __version__)))
    elif kind == "json":
        if len(models) == 1:
            print(to_json(reports[0].to_dict()))
        else:
            items = [r.to_dict() if r is not None else {"model": m, "error": e} for m, r, e in outcomes]
            print(
                to_json(
                    {
                        "schema_version": reports[0].to_dict()["schema_version"] if reports else 1,
                        "command": "analyze",
                        "models": items,
                    }
                )
            )
    else:
        for _, report, _ in outcomes:
            if report is not None:
                render_report(report, out)
        if len(models) > 1:
            render_summary(outcomes, lint, out)
    if any(e is not None for _, _, e in outcomes) or any(lint.fails(r) for r in reports):
        raise typer.Exit(1)


@app.command()
@handles_errors
def fold(
    model: ModelArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write the folded model.")
    ] = None,
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
    select: SelectOpt = None,
    type_: TypeOpt = None,
    leaf: LeafOpt = None,
    bn_to_affine: Annotated[
        bool,
        typer.Option(
            "--bn-to-affine",
            help="Turn BatchNorms no neighbour can absorb into a per-channel scale-and-shift "
            "(for backends without BatchNorm); by default they stay BatchNorm.",
        ),
    ] = False,
    speed_check: Annotated[
        bool,
        typer.Option(
            "--speed-check/--no-speed-check",
            help="Time folds that give a transposed conv a bias on this machine and keep the "
            "BatchNorm where the fold would be slower (FD108). Switch off when the model runs "
            "on another backend.",
        ),
    ] = True,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Show what would be folded and which modules would change; write nothing."
        ),
    ] = False,
) -> None:
    """Fold eval-mode BatchNorm into neighbouring conv/linear weights and write the result."""
    from .api import fold_to_file
    from .fold import fold as fold_model

    if output is None and not dry_run:
        raise UsageError("fold needs -o OUT (or --dry-run to only show the plan)")
    progress.enable(progress.wanted(quiet=as_json))
    loaded, inputs = _load(model, weights, trust_pickle, input_shape)
    if dry_run:
        plan = fold_model(
            loaded.model, inputs, dry_run=True, record_sources=True, eval_mode=eval_mode, select=select, types=type_,
            leaf_modules=leaf or (), bn_to_affine=bn_to_affine, speed_check=speed_check,
        ).report  # fmt: skip
        plan.model = loaded.source
        _emit(plan, as_json)
        return
    assert output is not None
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
        select=select,
        types=type_,
        leaf_modules=leaf or (),
        bn_to_affine=bn_to_affine,
        speed_check=speed_check,
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

    a = load(
        original, trust_pickle=trust_pickle, imports=_state["imports"], auto_import=_state["auto_import"]
    )
    b = load(
        rewritten, trust_pickle=trust_pickle, imports=_state["imports"], auto_import=_state["auto_import"]
    )
    inputs = inputs_for(a, input_shape) or inputs_for(b, input_shape)
    if inputs is None:
        raise UsageError("no example inputs: pass --input-shape")
    progress.enable(progress.wanted(quiet=as_json))
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
    as_json: JsonOpt = False,
) -> None:
    """Explain a diagnostic code (what it means, why it matters, how to fix it)."""
    if as_json:
        from .render import to_json

        chosen = [codes.get(code)] if code else list(codes.CODES.values())
        print(to_json([{**c.__dict__, "severity": c.severity.value} for c in chosen]))
        return
    if code is None:
        for c in codes.CODES.values():
            out.print(f"{c.id}  {c.severity.value:8} {c.name:24} {c.summary}", highlight=False)
        return
    c = codes.get(code)
    out.print(f"{c.id} ({c.name}, {c.severity.value}): {c.summary}\n\n{c.explanation}", highlight=False)


OutputOpt = Annotated[
    Path,
    typer.Option(
        "--output", "-o", help="Output: .pt2/.onnx/.py (need inputs) or a state_dict .pt/.safetensors."
    ),
]


@dataclass
class RewriteOptions:
    """The options every rewrite command (swap, insert, remove, fix) shares."""

    output: Path
    select: list[str] | None
    type_: list[str] | None
    weights: Path | None
    input_shape: list[str] | None
    fmt: str | None
    as_json: bool
    force: bool
    trust_pickle: bool


_KW = inspect.Parameter.KEYWORD_ONLY
_REWRITE_PARAMS = [
    inspect.Parameter("output", _KW, annotation=OutputOpt),
    inspect.Parameter("select", _KW, default=None, annotation=SelectOpt),
    inspect.Parameter("type_", _KW, default=None, annotation=TypeOpt),
    inspect.Parameter("weights", _KW, default=None, annotation=WeightsOpt),
    inspect.Parameter("input_shape", _KW, default=None, annotation=ShapeOpt),
    inspect.Parameter("fmt", _KW, default=None, annotation=FormatOpt),
    inspect.Parameter("as_json", _KW, default=False, annotation=JsonOpt),
    inspect.Parameter("force", _KW, default=False, annotation=ForceOpt),
    inspect.Parameter("trust_pickle", _KW, default=False, annotation=TrustOpt),
]


def rewrite_command(fn: Callable[..., None]) -> Callable[..., None]:
    """Declare the shared rewrite options once: typer sees them in the signature, and ``fn``
    receives them bundled as ``opts``."""
    hints = typing.get_type_hints(fn, include_extras=True)  # this module's annotations are strings
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in inspect.signature(fn).parameters.values()
        if p.name != "opts"
    ]
    names = [p.name for p in _REWRITE_PARAMS]

    @functools.wraps(fn)
    def wrapper(**kwargs: Any) -> None:
        opts = RewriteOptions(**{n: kwargs.pop(n) for n in names})
        fn(**kwargs, opts=opts)

    wrapper.__signature__ = inspect.Signature(own + _REWRITE_PARAMS)  # type: ignore[attr-defined]
    return wrapper


def _rewrite(model: str, opts: RewriteOptions, rewrite: Callable[[Any, Any], Any]) -> None:
    from .api import rewrite_to_file

    loaded, inputs = _load(model, opts.weights, opts.trust_pickle, opts.input_shape)
    report = rewrite_to_file(
        loaded, opts.output, inputs, lambda m: rewrite(m, inputs), fmt=opts.fmt, force=opts.force
    )
    _emit(report, opts.as_json)


@app.command()
@handles_errors
@rewrite_command
def swap(
    model: ModelArg,
    to: Annotated[str, typer.Option("--to", help="gn | ln | in | bn | frozen | sync")],
    groups: Annotated[
        int | None, typer.Option("--groups", help="GroupNorm groups (default: largest divisor of C <= 32).")
    ] = None,
    ln_dims: Annotated[
        str,
        typer.Option(
            "--ln-dims",
            help="LayerNorm over chw (channels+spatial, GroupNorm(1,C)) or c (channels per position).",
        ),
    ] = "chw",
    *,
    opts: RewriteOptions,
) -> None:
    """Swap norm layers (BN <-> GroupNorm/LayerNorm/InstanceNorm, frozen BN, SyncBatchNorm)."""
    from .surgery import swap as run

    _rewrite(
        model,
        opts,
        lambda m, x: run(
            m, to, select=opts.select, types=opts.type_, groups=groups, ln_dims=ln_dims, example_inputs=x
        ),
    )


@app.command()
@handles_errors
@rewrite_command
def insert(
    model: ModelArg,
    after: Annotated[
        str, typer.Option("--after", help="Comma list of conv, conv_transpose, linear.")
    ] = "conv,linear",
    norm: Annotated[str, typer.Option("--norm", help="bn (identity-initialized) or gn.")] = "bn",
    position: Annotated[
        str, typer.Option("--position", help="pre-act (right after the layer) or post-act.")
    ] = "pre-act",
    *,
    opts: RewriteOptions,
) -> None:
    """Add a norm after every matching conv/linear that lacks one (identity in eval for bn)."""
    from .surgery import insert as run

    _rewrite(
        model,
        opts,
        lambda m, x: run(
            m, after, norm=norm, position=position, select=opts.select, types=opts.type_, example_inputs=x
        ),
    )


@app.command()
@handles_errors
@rewrite_command
def remove(model: ModelArg, *, opts: RewriteOptions) -> None:
    """Strip the selected norm layers and report how much the output changes."""
    from .surgery import remove as run

    _rewrite(model, opts, lambda m, x: run(m, select=opts.select, types=opts.type_, example_inputs=x))


@app.command("fix")
@handles_errors
@rewrite_command
def fix_cmd(
    model: ModelArg,
    code: Annotated[
        list[str] | None, typer.Option("--code", help="Codes to fix (default: all fixable: BN001).")
    ] = None,
    *,
    opts: RewriteOptions,
) -> None:
    """Apply the fixes analysis offers (BN001: absorb a redundant bias into the BatchNorm)."""
    from .surgery import FIXABLE
    from .surgery import fix as run

    _rewrite(
        model,
        opts,
        lambda m, x: run(m, code or FIXABLE, select=opts.select, types=opts.type_, example_inputs=x),
    )


@app.command("recalibrate")
@handles_errors
def recalibrate_cmd(
    model: ModelArg,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Calibration batches: a .pt file (tensor or list of batches), .safetensors, or "
            "pkg.mod:make_loader (a factory returning any iterable of batches, e.g. a DataLoader).",
        ),
    ],
    output: OutputOpt,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Split a single tensor into batches of this size.")
    ] = None,
    max_batches: Annotated[
        int | None,
        typer.Option("--max-batches", help="Use at most this many batches (in total, over all ranks)."),
    ] = None,
    select: SelectOpt = None,
    type_: TypeOpt = None,
    weights: WeightsOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    trust_pickle: TrustOpt = False,
) -> None:
    """Re-estimate BatchNorm statistics from data (exact; under torchrun each rank takes a shard)."""
    import itertools
    import os

    import torch

    from .api import rewrite_to_file
    from .calibration import calibration_batches
    from .recalibrate import recalibrate

    if batch_size is not None and batch_size < 1:
        raise UsageError("--batch-size must be positive")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    progress.enable(progress.wanted(quiet=as_json or rank != 0))
    try:
        shard = calibration_batches(
            data, batch_size=batch_size, max_batches=max_batches, rank=rank, world_size=world
        )
        first = next(shard, None)
        if first is None and world == 1:
            raise BnrewriteError(f"--data {data}: holds no calibration batch")
        # a rank without batches still takes part in the all-reduce (it adds nothing)
        batches = itertools.chain([first], shard) if first is not None else iter(())
        loaded, _ = _load(model, weights, trust_pickle, None)
        inputs = None if first is None else tuple(first) if isinstance(first, (list, tuple)) else (first,)
        report = rewrite_to_file(
            loaded,
            output,
            inputs,
            lambda m: recalibrate(m, batches, select=select, types=type_),
            fmt=fmt,
            force=force,
            write=rank == 0,
        )
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        _emit(report, as_json)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SystemExit:
        raise
    sys.exit(0)
