import torch
from torch import nn

from bnrewrite import fold
from bnrewrite.verify import verify
from tests.conftest import load_sample, randomize_bn


def test_passes_for_a_correct_fold_and_reports_per_output():
    model, inputs = load_sample("resnet")
    folded, _ = fold(model, inputs)
    result = verify(model, folded, inputs)
    assert result.passed
    assert len(result.checks) == 3  # the given inputs and two random sets
    assert all(c.max_abs_error <= c.tolerance for c in result.checks)


def test_fails_and_names_the_first_diverging_node():
    model, inputs = load_sample("resnet")
    folded, _ = fold(model, inputs)
    with torch.no_grad():
        folded.get_submodule("layers.1.conv2").weight.mul_(1.5)
    result = verify(model, folded, inputs)
    assert not result.passed
    assert result.first_divergence["node"] == "layers_1_conv2"
    assert result.first_divergence["original_node"] == "layers_1_bn2"


def test_tolerance_defaults_follow_dtype():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).to(torch.float16)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float16)
    folded, _ = fold(model, (x,))
    result = verify(model, folded, (x,))
    assert result.passed and result.checks[0].dtype == "float16"


def test_multiple_outputs_and_no_state_change_in_training_mode():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(x), x * 2

    model = Two().train()
    before = model.bn.running_mean.clone()
    result = verify(model, model, (torch.randn(8, 4),), random_sets=1)
    assert result.passed and len(result.checks) == 4
    assert torch.equal(model.bn.running_mean, before)
