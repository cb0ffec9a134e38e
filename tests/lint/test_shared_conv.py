from bnrewrite import analyze
from tests.conftest import load_sample

from ._models import codes_at, conv_bn, x4


def test_fires_on_conv_called_twice():
    model, inputs = load_sample("shared_conv")
    assert codes_at(analyze(model, inputs), "BN010") == ["shared"]


def test_silent_on_single_call():
    assert codes_at(analyze(conv_bn(), x4()), "BN010") == []
