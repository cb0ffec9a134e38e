"""``bnrewrite fold``, ``verify``, ``export`` and ``explain``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bnrewrite import codes, progress
from bnrewrite.cli import base
from bnrewrite.cli.base import (
    ForceOpt,
    FormatOpt,
    JsonOpt,
    KeepBranchesOpt,
    LeafOpt,
    ModelArg,
    SelectOpt,
    ShapeOpt,
    TrustOpt,
    TypeOpt,
    WeightsOpt,
    _emit,
    _state,
    app,
    handles_errors,
    out,
)
from bnrewrite.errors import UsageError

FoldOutputOpt = Annotated[
    Path | None, typer.Option("--output", "-o", help="Where to write the folded model.")
]
VerifyOpt = Annotated[
    bool, typer.Option("--verify", help="Check the result numerically; write nothing if it fails.")
]
EvalOpt = Annotated[bool, typer.Option("--eval", help="Fold BatchNorms in training mode as if in eval mode.")]
DynamicBatchOpt = Annotated[
    bool, typer.Option("--dynamic-batch", help="Export with a dynamic batch dimension.")
]
GraphOpt = Annotated[
    Path | None, typer.Option("--graph", help="Also write a before/after picture (.svg or .dot).")
]
BnToAffineOpt = Annotated[
    bool,
    typer.Option(
        "--bn-to-affine",
        help="Turn BatchNorms no neighbour can absorb into a per-channel scale-and-shift "
        "(for backends without BatchNorm); by default they stay BatchNorm.",
    ),
]
SpeedCheckOpt = Annotated[
    bool,
    typer.Option(
        "--speed-check/--no-speed-check",
        help="Time folds that give a transposed conv a bias on this machine and keep the "
        "BatchNorm where the fold would be slower (FD108). Switch off when the model runs "
        "on another backend.",
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run", help="Show what would be folded and which modules would change; write nothing."
    ),
]


@app.command()
@handles_errors
def fold(
    model: ModelArg,
    output: FoldOutputOpt = None,
    weights: WeightsOpt = None,
    input_shape: ShapeOpt = None,
    verify: VerifyOpt = False,
    eval_mode: EvalOpt = False,
    fmt: FormatOpt = None,
    dynamic_batch: DynamicBatchOpt = False,
    graph: GraphOpt = None,
    as_json: JsonOpt = False,
    force: ForceOpt = False,
    trust_pickle: TrustOpt = False,
    select: SelectOpt = None,
    type_: TypeOpt = None,
    leaf: LeafOpt = None,
    bn_to_affine: BnToAffineOpt = False,
    speed_check: SpeedCheckOpt = True,
    keep_branches: KeepBranchesOpt = False,
    norm_affine: base.NormAffineOpt = False,
    dry_run: DryRunOpt = False,
    target_dtype: base.TargetDtypeOpt = None,
    plot: base.PlotOpt = None,
) -> None:
    """Fold eval-mode BatchNorm into neighbouring conv/linear weights and write the result."""
    from bnrewrite.config import load_config
    from bnrewrite.fold import fold as fold_model
    from bnrewrite.pipeline import fold_and_write

    if output is None and not dry_run:
        raise UsageError("fold needs -o OUT (or --dry-run to only show the plan)")
    progress.enable(progress.wanted(quiet=as_json))
    base.check_plot(plot, force)
    loaded, inputs = base._load(model, weights, trust_pickle, input_shape)
    options = {
        "eval_mode": eval_mode,
        "select": select,
        "types": type_,
        "leaf_modules": leaf or (),
        "bn_to_affine": bn_to_affine,
        "speed_check": speed_check,
        "merge_branches": not keep_branches,
        "norm_affine": norm_affine,
        "precision": load_config().precision,
        "target_dtype": base.dtype_option(target_dtype, "--target-dtype"),
    }
    if dry_run:
        report = fold_model(loaded.model, inputs, dry_run=True, record_sources=True, **options).report
        report.model = loaded.source
    else:
        assert output is not None
        report = fold_and_write(
            loaded, output, inputs, verify=verify, fmt=fmt, dynamic_batch=dynamic_batch, graph=graph,
            force=force, **options,
        )  # fmt: skip
    base.write_plot(report, plot, force)
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
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype", help="fp16|bf16: run both models in this dtype against float64 and report both errors."
        ),
    ] = None,
) -> None:
    """Check that REWRITTEN computes what ORIGINAL computes (float64 reference)."""
    from bnrewrite.load import inputs_for, load
    from bnrewrite.render import to_json
    from bnrewrite.verify import verify

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
    result = verify(a.model, b.model, inputs, rtol=rtol, atol=atol, dtype=base.dtype_option(dtype, "--dtype"))
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
    from bnrewrite.export import export as run
    from bnrewrite.render import to_json

    loaded, inputs = base._load(model, weights, trust_pickle, input_shape)
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
        from bnrewrite.render import to_json

        chosen = [codes.get(code)] if code else list(codes.CODES.values())
        print(to_json([{**c.__dict__, "severity": c.severity.value} for c in chosen]))
        return
    if code is None:
        for c in codes.CODES.values():
            out.print(f"{c.id}  {c.severity.value:8} {c.name:24} {c.summary}", highlight=False)
        return
    c = codes.get(code)
    out.print(f"{c.id} ({c.name}, {c.severity.value}): {c.summary}\n\n{c.explanation}", highlight=False)
