from bnrewrite import analyze

from ._models import codes_at, conv_bn, x4


def test_fires_in_training_mode():
    assert codes_at(analyze(conv_bn(train=True), x4()), "BN002") == ["_1"]


def test_silent_in_eval_mode():
    assert codes_at(analyze(conv_bn(train=False), x4()), "BN002") == []
