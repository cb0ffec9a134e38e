from bnrewrite.select import Selector


def test_no_selector_selects_everything():
    assert Selector.of().matches("a.b", "BatchNorm2d") and Selector.of().matches(None, "F.batch_norm")


def test_globs_are_alternatives_and_type_must_also_match():
    s = Selector.of(["layer1.*", "stem"], ["BatchNorm2d"])
    assert s.matches("layer1.0.bn1", "BatchNorm2d")
    assert s.matches("stem", "batchnorm2d")  # kinds compare case-insensitively
    assert not s.matches("layer2.0.bn1", "BatchNorm2d")
    assert not s.matches("layer1.0.bn1", "GroupNorm")


def test_types_accept_classes():
    from torch import nn

    assert Selector.of(types=[nn.BatchNorm1d]).matches("x", "BatchNorm1d")
