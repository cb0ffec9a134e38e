"""Networks no one here wrote (MONAI, pure PyTorch): analyzed, folded and verified."""

from __future__ import annotations

import pytest
import torch

from bnrewrite import analyze, fold
from bnrewrite.verify import verify

monai = pytest.importorskip("monai.networks.nets")


def _trained(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


CASES = {
    "UNet": (lambda: monai.UNet(2, 1, 2, (8, 16, 32), (2, 2), num_res_units=1, norm="batch"), (1, 1, 32, 32)),
    "BasicUNet": (
        lambda: monai.BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4), norm="batch"),
        (1, 1, 32, 32),
    ),
    "SegResNet": (lambda: monai.SegResNet(2, 8, 1, 2, norm="batch"), (1, 1, 32, 32)),
    "DenseNet121": (lambda: monai.DenseNet121(2, 1, 3, init_features=8, growth_rate=4), (2, 1, 32, 32)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_monai_network(name):
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = _trained(build())
    x = (torch.randn(shape),)
    report = analyze(model, x)
    assert report.norms, "norm layers found"
    folded, fold_report = fold(model, x)
    assert fold_report.actions
    assert verify(model, folded, x).passed
