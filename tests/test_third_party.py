"""Networks no one here wrote (MONAI, efficientnet_pytorch; pure PyTorch, no weights): analyzed,
folded into the user's own class with no BatchNorm left where the report says folded, verified."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from bnrewrite import analyze, fold
from bnrewrite.semantics.norms import is_batchnorm_module
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
    # every block is registered twice (e.g. input_block and skip_layers.downsample): one object
    "DynUNet": (
        lambda: monai.DynUNet(2, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], norm_name="batch"),
        (1, 1, 32, 32),
    ),
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
    _assert_own_class_and_folded(model, folded, fold_report)
    assert verify(model, folded, x).passed


def _assert_own_class_and_folded(model, folded, report):
    assert type(folded) is type(model) and not isinstance(folded, fx.GraphModule)
    merged = {d.module_path for d in report.diagnostics if d.code == "FD109"}  # blocks that became one conv
    assert not [d for d in report.diagnostics if d.code == "FD207"]
    assert {d.module_path for d in report.diagnostics if d.code == "FD104"} <= merged
    for a in report.actions:
        inside = any(a.module_path and (a.module_path + ".").startswith(m + ".") for m in merged)
        if a.kind.startswith("fold") and not inside:
            assert type(folded.get_submodule(a.module_path)) is nn.Identity, a.module_path
    kept = {d.module_path for d in report.diagnostics if d.code.startswith(("FD2", "BN0", "FD108"))}
    left = {p for p, m in folded.named_modules(remove_duplicate=False) if is_batchnorm_module(m)}
    assert left <= kept  # a BatchNorm is left only where the report says why


@pytest.mark.parametrize("variant", ["efficientnet-b0", "efficientnet-b3"])
def test_efficientnet_pytorch(variant):
    efficientnet = pytest.importorskip("efficientnet_pytorch")
    torch.manual_seed(0)
    model = _trained(efficientnet.EfficientNet.from_name(variant))
    x = (torch.randn(1, 3, 64, 64),)
    folded, report = fold(model, x)
    n_bn = sum(is_batchnorm_module(m) for m in model.modules())
    assert len(report.actions) == n_bn and all(a.kind == "fold-into-preceding" for a in report.actions)
    _assert_own_class_and_folded(model, folded, report)
    assert folded.extract_features(x[0]).shape == model.extract_features(x[0]).shape  # its own methods
    assert verify(model, folded, x).passed


def dynunet() -> nn.Module:
    """Factory for the round trip below (every block registered at two paths)."""
    torch.manual_seed(0)
    return _trained(CASES["DynUNet"][0]())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_aliased_blocks_round_trip_strictly(suffix, tmp_path):
    from bnrewrite import export, load

    model = dynunet()
    x = (torch.randn(1, 1, 32, 32),)
    folded, _ = fold(model, x)
    path = tmp_path / f"folded{suffix}"
    export(folded, path)
    loaded = load("tests.test_third_party:dynunet", weights=path).model
    assert not any(is_batchnorm_module(m) for m in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(*x), folded(*x))
