"""``bnrewrite swap``, ``insert``, ``remove``, ``fix`` and ``recalibrate``."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from bnrewrite import progress
from bnrewrite.cli import base
from bnrewrite.cli.base import (
    ForceOpt,
    FormatOpt,
    JsonOpt,
    ModelArg,
    SelectOpt,
    ShapeOpt,
    TrustOpt,
    TypeOpt,
    WeightsOpt,
    _emit,
    app,
    handles_errors,
)
from bnrewrite.errors import BnrewriteError, UsageError

OutputOpt = Annotated[
    Path,
    typer.Option(
        "--output", "-o", help="Output: .pt2/.onnx/.py (need inputs) or a state_dict .pt/.safetensors."
    ),
]
RewriteOutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Output: .pt2/.onnx/.py (need inputs) or a state_dict .pt/.safetensors (not with --dry-run).",
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run", help="Show the edits (which modules change, which become graphs); write nothing."
    ),
]


@dataclass
class RewriteOptions:
    """The options every rewrite command (swap, insert, remove, fix) shares."""

    output: Path | None
    dry_run: bool
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
    inspect.Parameter("output", _KW, default=None, annotation=RewriteOutputOpt),
    inspect.Parameter("dry_run", _KW, default=False, annotation=DryRunOpt),
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


def _rewrite(model: str, opts: RewriteOptions, rewrite: Callable[..., Any], plot: Path | None = None) -> None:
    """Run ``rewrite(model, inputs, dry_run=...)`` and write the result, or only show its plan."""
    from bnrewrite.pipeline import rewrite_to_file

    if opts.output is None and not opts.dry_run:
        raise UsageError("needs -o OUT (or --dry-run to only show the edits)")
    loaded, inputs = base._load(model, opts.weights, opts.trust_pickle, opts.input_shape)
    if opts.dry_run:
        report = rewrite(loaded.model, inputs, dry_run=True).report
        report.model = loaded.source
        base.write_plot(report, plot, opts.force)
        _emit(report, opts.as_json)
        return
    assert opts.output is not None
    report = rewrite_to_file(
        loaded,
        opts.output,
        inputs,
        lambda m: rewrite(m, inputs, dry_run=False),
        fmt=opts.fmt,
        force=opts.force,
    )
    base.write_plot(report, plot, opts.force)
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
    from bnrewrite.surgery import swap as run

    _rewrite(
        model,
        opts,
        lambda m, x, dry_run: run(
            m,
            to,
            select=opts.select,
            types=opts.type_,
            groups=groups,
            ln_dims=ln_dims,
            example_inputs=x,
            dry_run=dry_run,
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
    from bnrewrite.surgery import insert as run

    _rewrite(
        model,
        opts,
        lambda m, x, dry_run: run(
            m,
            after,
            norm=norm,
            position=position,
            select=opts.select,
            types=opts.type_,
            example_inputs=x,
            dry_run=dry_run,
        ),
    )


@app.command()
@handles_errors
@rewrite_command
def remove(model: ModelArg, *, opts: RewriteOptions) -> None:
    """Strip the selected norm layers and report how much the output changes."""
    from bnrewrite.surgery import remove as run

    _rewrite(
        model,
        opts,
        lambda m, x, dry_run: run(m, select=opts.select, types=opts.type_, example_inputs=x, dry_run=dry_run),
    )


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
    from bnrewrite.surgery import FIXABLE
    from bnrewrite.surgery import fix as run

    _rewrite(
        model,
        opts,
        lambda m, x, dry_run: run(
            m, code or FIXABLE, select=opts.select, types=opts.type_, example_inputs=x, dry_run=dry_run
        ),
    )


@app.command("equalize")
@handles_errors
def equalize_cmd(
    model: ModelArg,
    output: RewriteOutputOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Show the pairs and scales and the precision before/after; write nothing."
        ),
    ] = False,
    weights: WeightsOpt = None,
    input_shape: ShapeOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    trust_pickle: TrustOpt = False,
    plot: base.PlotOpt = None,
) -> None:
    """Cross-layer equalization: rescale the channels between layers joined by ReLU-like ops so
    per-tensor int8 weights keep every channel (folds BatchNorms first; proven against float64)."""
    from bnrewrite.equalize import equalize as run

    opts = RewriteOptions(
        output, dry_run, None, None, weights, input_shape, fmt, as_json, force, trust_pickle
    )
    base.check_plot(plot, force)
    _rewrite(model, opts, lambda m, x, dry_run: run(m, x, dry_run=dry_run), plot=plot)


DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        help="Calibration batches: a .pt file (tensor or list of batches), .safetensors, or "
        "pkg.mod:make_loader (a factory returning any iterable of batches, e.g. a DataLoader).",
    ),
]
BatchSizeOpt = Annotated[
    int | None, typer.Option("--batch-size", help="Split a single tensor into batches of this size.")
]
MaxBatchesOpt = Annotated[
    int | None,
    typer.Option("--max-batches", help="Use at most this many batches (in total, over all ranks)."),
]


@app.command("recalibrate")
@handles_errors
def recalibrate_cmd(
    model: ModelArg,
    data: DataOpt,
    output: OutputOpt,
    batch_size: BatchSizeOpt = None,
    max_batches: MaxBatchesOpt = None,
    select: SelectOpt = None,
    type_: TypeOpt = None,
    weights: WeightsOpt = None,
    fmt: FormatOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    trust_pickle: TrustOpt = False,
) -> None:
    """Re-estimate BatchNorm statistics from data (exact; under torchrun each rank takes a shard)."""
    import os

    import torch

    from bnrewrite.pipeline import rewrite_to_file
    from bnrewrite.recalibrate import recalibrate

    if batch_size is not None and batch_size < 1:
        raise UsageError("--batch-size must be positive")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    progress.enable(progress.wanted(quiet=as_json or rank != 0))
    try:
        batches, first = _shard(data, batch_size, max_batches, rank, world)
        loaded, _ = base._load(model, weights, trust_pickle, None)
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


def _shard(
    data: str, batch_size: int | None, max_batches: int | None, rank: int, world: int
) -> tuple[Any, Any]:
    """This rank's batches (an iterator) and its first batch (for example inputs), or None."""
    import itertools

    from bnrewrite.calibration import calibration_batches

    shard = calibration_batches(
        data, batch_size=batch_size, max_batches=max_batches, rank=rank, world_size=world
    )
    first = next(shard, None)
    if first is None and world == 1:
        raise BnrewriteError(f"--data {data}: holds no calibration batch")
    # a rank without batches still takes part in the all-reduce (it adds nothing)
    return (itertools.chain([first], shard) if first is not None else iter(())), first
