"""Lint configuration: ``[tool.bnrewrite]`` in ``pyproject.toml``, found like ruff finds its own.

The first ``pyproject.toml`` with a ``[tool.bnrewrite]`` table, from the current directory
upward, configures ``analyze``; command-line flags override it::

    [tool.bnrewrite]
    report = ["BN", "FD2"]          # codes (or code prefixes) to report; default: all
    ignore = ["BN003"]              # codes (or prefixes) never reported
    fail-on = "warning"             # error | warning | info | never
    [tool.bnrewrite.per-module-ignores]
    "backbone.*" = ["BN001"]        # dotted module-path glob -> codes accepted there
    [tool.bnrewrite.precision]
    int8-spread = 16                # PR002: largest / smallest per-channel weight range
    sqnr-gap-db = 6                 # PR002: per-tensor int8 SQNR this far below per-channel
    ill-conditioned-scale = 1000    # PR004: |gamma| / sqrt(var + eps) above this

A finding is reported when its code matches ``report`` (if given), matches no ``ignore``, and
no per-module ignore whose glob matches its module path lists it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bnrewrite.diagnostics import Diagnostic, Report, Severity
from bnrewrite.errors import UsageError
from bnrewrite.weight_precision import PrecisionThresholds

FAIL_ON = ("error", "warning", "info", "never")


@dataclass(frozen=True)
class LintConfig:
    report: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    per_module_ignores: tuple[tuple[str, tuple[str, ...]], ...] = ()
    fail_on: str = "error"
    source: str | None = None  # the pyproject.toml it came from
    precision: PrecisionThresholds = field(default_factory=PrecisionThresholds)

    def keeps(self, d: Diagnostic) -> bool:
        if self.report and not _matches(d.code, self.report):
            return False
        if _matches(d.code, self.ignore):
            return False
        path = d.module_path or ""
        return not any(
            fnmatch.fnmatchcase(path, glob) and _matches(d.code, codes)
            for glob, codes in self.per_module_ignores
        )

    def filter(self, report: Report) -> Report:
        """The report with only the findings this configuration reports."""
        report.diagnostics = [d for d in report.diagnostics if self.keeps(d)]
        return report

    def fails(self, report: Report) -> bool:
        return self.fail_on != "never" and report.has_at_least(Severity(self.fail_on))

    def overridden(
        self,
        *,
        report: list[str] | None = None,
        ignore: list[str] | None = None,
        per_module_ignores: list[str] | None = None,
        fail_on: str | None = None,
    ) -> LintConfig:
        """This configuration with the command line's flags on top (flags add to ``ignore`` and
        per-module ignores, and replace ``report`` and ``fail-on``)."""
        extra = tuple(_parse_per_module(p) for p in per_module_ignores or ())
        return replace(
            self,
            report=tuple(_codes(report, "--only-codes")) if report else self.report,
            ignore=self.ignore + tuple(_codes(ignore or [], "--ignore-codes")),
            per_module_ignores=self.per_module_ignores + extra,
            fail_on=_fail_on(fail_on) if fail_on is not None else self.fail_on,
        )


def _matches(code: str, patterns: tuple[str, ...]) -> bool:
    return any(code == p or code.startswith(p) for p in patterns)


def _codes(values: Any, where: str) -> list[str]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise UsageError(f"{where}: expected a list of codes, got {values!r}")
    return [v.strip().upper() for item in values for v in item.split(",") if v.strip()]


def _fail_on(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in FAIL_ON:
        raise UsageError(f"fail-on {value!r}: expected one of {', '.join(FAIL_ON)}")
    return value.lower()


def _parse_per_module(text: str) -> tuple[str, tuple[str, ...]]:
    glob, sep, codes = text.partition(":")
    if not sep or not glob or not codes:
        raise UsageError(f"--per-module-ignore {text!r}: expected GLOB:CODE[,CODE...]")
    return glob, tuple(_codes(codes, "--per-module-ignore"))


def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` with a ``[tool.bnrewrite]`` table, from ``start`` up."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file() and _table(candidate) is not None:
            return candidate
    return None


def _table(path: Path) -> dict[str, Any] | None:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: cannot be read as TOML: {exc}") from exc
    table = data.get("tool", {}).get("bnrewrite")
    return table if isinstance(table, dict) else None


KEYS = {"report", "ignore", "per-module-ignores", "fail-on", "precision"}
PRECISION_KEYS = {
    "int8-spread": "int8_spread",
    "sqnr-gap-db": "sqnr_gap_db",
    "ill-conditioned-scale": "ill_conditioned_scale",
}


def _precision(table: Any, path: Path) -> PrecisionThresholds:
    if not isinstance(table, dict):
        raise UsageError(f"{path}: [tool.bnrewrite.precision] must be a table")
    unknown = sorted(set(table) - set(PRECISION_KEYS))
    if unknown:
        raise UsageError(
            f"{path}: unknown [tool.bnrewrite.precision] keys: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(PRECISION_KEYS))})"
        )
    values = {}
    for key, value in table.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise UsageError(
                f"{path}: [tool.bnrewrite.precision] {key} must be a positive number, got {value!r}"
            )
        values[PRECISION_KEYS[key]] = float(value)
    return PrecisionThresholds(**values)


def load_config(path: Path | None = None, *, search: bool = True) -> LintConfig:
    """The configuration at ``path``, else the one found from the current directory upward,
    else the defaults. Unknown keys are an error (a typo must not silently disable a check)."""
    if path is None and search:
        path = find_pyproject()
    if path is None:
        return LintConfig()
    table = _table(path)
    if table is None:
        raise UsageError(f"{path}: has no [tool.bnrewrite] table")
    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise UsageError(
            f"{path}: unknown [tool.bnrewrite] keys: {', '.join(unknown)} (known: {', '.join(sorted(KEYS))})"
        )
    per_module = table.get("per-module-ignores", {})
    if not isinstance(per_module, dict):
        raise UsageError(f"{path}: per-module-ignores must be a table of glob = [codes]")
    return LintConfig(
        report=tuple(_codes(table.get("report", []), f"{path}: report")),
        ignore=tuple(_codes(table.get("ignore", []), f"{path}: ignore")),
        per_module_ignores=tuple(
            (g, tuple(_codes(c, f"{path}: per-module-ignores"))) for g, c in per_module.items()
        ),
        fail_on=_fail_on(table.get("fail-on", "error")),
        source=str(path),
        precision=_precision(table.get("precision", {}), path),
    )
