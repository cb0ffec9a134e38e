import pytest
import torch

from bnrewrite import analyze

from ._models import codes_at, conv_bn, x4


@pytest.mark.parametrize(
    "attr,value",
    [
        ("running_var", float("nan")),
        ("running_var", -1.0),
        ("running_var", 0.0),
        ("running_mean", float("inf")),
        ("weight", float("nan")),
    ],
)
def test_fires_on_bad_values(attr, value):
    m = conv_bn()
    with torch.no_grad():
        getattr(m[1], attr)[0] = value
    report = analyze(m, x4())
    assert codes_at(report, "BN004") == ["_1"]
    assert report.has_at_least(report.diagnostics[0].severity.__class__("error"))


def test_silent_on_good_values():
    assert codes_at(analyze(conv_bn(), x4()), "BN004") == []
