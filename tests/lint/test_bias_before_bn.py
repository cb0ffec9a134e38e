from bnrewrite import analyze

from ._models import codes_at, conv_bn, x4


def test_fires_on_conv_bias_before_bn():
    report = analyze(conv_bn(bias=True), x4())
    assert codes_at(report, "BN001") == ["_0"]
    diag = next(d for d in report.diagnostics if d.code == "BN001")
    assert diag.module_path == "0"


def test_silent_without_bias():
    assert codes_at(analyze(conv_bn(bias=False), x4()), "BN001") == []
