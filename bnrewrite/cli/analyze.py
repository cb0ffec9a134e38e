"""``bnrewrite analyze``: inventory and lint findings for one or several models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bnrewrite import progress
from bnrewrite.cli import base
from bnrewrite.cli.base import (
    JsonOpt,
    KeepBranchesOpt,
    LeafOpt,
    SelectOpt,
    ShapeOpt,
    TrustOpt,
    TypeOpt,
    WeightsOpt,
    app,
    handles_errors,
    out,
)
from bnrewrite.errors import BnrewriteError, UsageError

ModelsArg = Annotated[
    list[str],
    typer.Argument(help="One or more models: .pt2 files, package.module:factory specs, pickled modules."),
]
OutputFormatOpt = Annotated[
    str | None,
    typer.Option("--format", help="Output: text (default), json (as --json) or sarif (SARIF 2.1.0)."),
]
FailOnOpt = Annotated[
    str | None,
    typer.Option(
        "--fail-on",
        help="Exit 1 when findings at or above this severity exist: error|warning|info|never "
        "(default: the config's fail-on, else error).",
    ),
]
OnlyCodesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--only-codes", help="Report only these codes or code prefixes (repeatable, or comma-separated)."
    ),
]
IgnoreCodesOpt = Annotated[
    list[str] | None,
    typer.Option("--ignore-codes", help="Never report these codes or code prefixes (repeatable)."),
]
PerModuleOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--per-module-ignore", help="GLOB:CODE[,CODE]: accept these codes in matching module paths."
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="pyproject.toml to read [tool.bnrewrite] from (default: found upward)."),
]
NoConfigOpt = Annotated[bool, typer.Option("--no-config", help="Ignore any [tool.bnrewrite] table.")]


@app.command()
@handles_errors
def analyze(
    models: ModelsArg,
    weights: WeightsOpt = None,
    input_shape: ShapeOpt = None,
    as_json: JsonOpt = False,
    fmt: OutputFormatOpt = None,
    fail_on: FailOnOpt = None,
    only_codes: OnlyCodesOpt = None,
    ignore_codes: IgnoreCodesOpt = None,
    per_module_ignore: PerModuleOpt = None,
    config: ConfigOpt = None,
    no_config: NoConfigOpt = False,
    trust_pickle: TrustOpt = False,
    select: SelectOpt = None,
    type_: TypeOpt = None,
    leaf: LeafOpt = None,
    keep_branches: KeepBranchesOpt = False,
    norm_affine: base.NormAffineOpt = False,
    plot: base.PlotOpt = None,
) -> None:
    """List every norm layer with its fold verdict, and lint for BatchNorm pitfalls.

    Several models give one summary table and one exit code over all of them."""
    from bnrewrite.analyze import analyze as run
    from bnrewrite.config import load_config

    kind = (fmt or ("json" if as_json else "text")).lower()
    if kind not in ("text", "json", "sarif"):
        raise UsageError(f"--format {fmt!r}: expected text, json or sarif")
    lint = load_config(config, search=not no_config).overridden(
        report=only_codes, ignore=ignore_codes, per_module_ignores=per_module_ignore, fail_on=fail_on
    )
    progress.enable(progress.wanted(quiet=kind != "text"))
    if plot is not None and len(models) > 1:
        raise UsageError("--plot draws one model: analyze one model with it")
    base.check_plot(plot, False)
    outcomes: list[tuple[str, Any, str | None]] = []
    for spec in progress.track(models, "models analyzed") if len(models) > 1 else models:
        try:
            loaded, inputs = base._load(spec, weights, trust_pickle, input_shape)
            report = run(
                loaded.model, inputs, name=loaded.source, select=select, types=type_, leaf_modules=leaf or (),
                merge_branches=not keep_branches, precision=lint.precision, norm_affine=norm_affine,
            )  # fmt: skip
        except BnrewriteError as exc:
            if len(models) == 1:
                raise
            outcomes.append((spec, None, str(exc)))
            continue
        base.write_plot(report, plot, False)
        outcomes.append((spec, lint.filter(report), None))
    _print(outcomes, kind, lint, several=len(models) > 1)
    reports = [r for _, r, _ in outcomes if r is not None]
    if any(e is not None for _, _, e in outcomes) or any(lint.fails(r) for r in reports):
        raise typer.Exit(1)


def _print(outcomes: list[tuple[str, Any, str | None]], kind: str, lint: Any, *, several: bool) -> None:
    """The reports as SARIF, JSON (one report, or a ``models`` list) or tables and a summary."""
    from bnrewrite import __version__
    from bnrewrite.render import render_report, render_summary, to_json
    from bnrewrite.sarif import to_sarif

    reports = [r for _, r, _ in outcomes if r is not None]
    if kind == "sarif":
        print(to_json(to_sarif(reports, __version__)))
    elif kind == "json" and not several:
        print(to_json(reports[0].to_dict()))
    elif kind == "json":
        items = [r.to_dict() if r is not None else {"model": m, "error": e} for m, r, e in outcomes]
        version = reports[0].to_dict()["schema_version"] if reports else 1
        print(to_json({"schema_version": version, "command": "analyze", "models": items}))
    else:
        for _, report, _ in outcomes:
            if report is not None:
                render_report(report, out)
        if several:
            render_summary(outcomes, lint, out)
