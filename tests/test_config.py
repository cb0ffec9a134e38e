"""[tool.bnrewrite] configuration, code filters and fail-on, found from the directory upward."""

from __future__ import annotations

import pytest

from bnrewrite.config import LintConfig, find_pyproject, load_config
from bnrewrite.diagnostics import Diagnostic, Report, Severity
from bnrewrite.errors import UsageError


def _report(*items: tuple[str, str, str]) -> Report:
    report = Report("analyze", "m")
    for code, severity, path in items:
        report.add(Diagnostic(code, Severity(severity), f"{path}: {code}", None, path))
    return report


def test_found_upward_and_applied(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.bnrewrite]\nignore = ["BN003"]\nfail-on = "warning"\n'
        '[tool.bnrewrite.per-module-ignores]\n"backbone.*" = ["BN001"]\n'
    )
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert find_pyproject() == (tmp_path / "pyproject.toml").resolve()
    cfg = load_config()
    report = cfg.filter(
        _report(
            ("BN003", "warning", "x"),
            ("BN001", "warning", "backbone.layer1.conv"),
            ("BN001", "warning", "head.conv"),
            ("FD206", "info", "head.bn"),
        )
    )
    assert [(d.code, d.module_path) for d in report.diagnostics] == [
        ("BN001", "head.conv"),
        ("FD206", "head.bn"),
    ]
    assert cfg.fails(report)


def test_report_prefixes_and_command_line_overrides():
    cfg = LintConfig(report=("BN",), fail_on="error").overridden(ignore=["BN001"], fail_on="never")
    report = cfg.filter(_report(("BN001", "warning", "a"), ("BN004", "error", "b"), ("FD201", "info", "c")))
    assert [d.code for d in report.diagnostics] == ["BN004"]
    assert not cfg.fails(report)  # fail-on never
    only = LintConfig().overridden(report=["FD2"], per_module_ignores=["c*:FD201"])
    assert only.filter(_report(("FD201", "info", "c"), ("FD202", "info", "c"))).codes() == ["FD202"]


def test_a_typo_in_the_config_is_an_error_not_a_silently_disabled_check(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text('[tool.bnrewrite]\nignor = ["BN003"]\n')
    with pytest.raises(UsageError, match=r"unknown .* keys: ignor"):
        load_config(path)
    path.write_text('[tool.bnrewrite]\nfail-on = "sometimes"\n')
    with pytest.raises(UsageError, match="fail-on"):
        load_config(path)
    with pytest.raises(UsageError, match="GLOB:CODE"):
        LintConfig().overridden(per_module_ignores=["no-colon"])
