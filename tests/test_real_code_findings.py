"""Issue-12 patterns seen in third-party model code, reproduced with small models written here."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from typer.testing import CliRunner

from bnrewrite import BnrewriteError, analyze, fold
from bnrewrite.cli import app
from bnrewrite.errors import VerificationError
from bnrewrite.load import Loaded, load
from bnrewrite.modules import FrozenBatchNorm
from bnrewrite.pipeline import fold_and_write
from bnrewrite.verify import verify
from tests.conftest import randomize_bn


class StdConv2d(nn.Conv2d):
    """Weight standardization (as in BiT/ResNetV2): batch_norm applied to the weight."""

    def forward(self, x):
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-5
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class WSNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = StdConv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)

    def forward(self, x):
        return torch.relu(self.gn(self.conv(x)))


def build_ws() -> nn.Module:
    return WSNet().eval()


def test_weight_standardization_is_not_reported_as_batchnorm():
    report = analyze(build_ws(), (torch.randn(1, 3, 8, 8),))
    assert not [d for d in report.diagnostics if d.code in ("BN005", "BN008")]
    assert [n.kind for n in report.norms] == ["GroupNorm"]
    model = build_ws()
    for d in report.diagnostics:
        if d.module_path:
            model.get_submodule(d.module_path)  # every named path exists


def test_weight_standardization_passes_fail_on_warning_in_the_cli():
    res = CliRunner().invoke(
        app, ["analyze", "tests.test_real_code_findings:build_ws", "-s", "1,3,8,8", "--fail-on", "warning"]
    )
    assert res.exit_code == 0, res.output


class FrozenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = FrozenBatchNorm(8)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def test_frozen_batchnorm_is_found_and_folded_in_an_export_graph():
    model = FrozenNet().eval()
    x = (torch.randn(2, 3, 9, 9),)
    ep = torch.export.export(model, x)
    report = analyze(ep)
    assert [(n.family, n.verdict) for n in report.norms] == [("frozen", "fold-into-preceding")]
    folded, fold_report = fold(ep)
    assert [(a.kind, a.module_path) for a in fold_report.actions] == [("fold-into-preceding", "bn")]
    targets = [str(n.target) for n in folded.graph.nodes if n.op == "call_function"]
    assert not any("mul" in t or "rsqrt" in t for t in targets)  # the op-by-op BN is gone
    assert verify(model, folded, x).passed


@dataclass
class Prediction:
    logits: torch.Tensor
    hidden: torch.Tensor


class DataclassOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.bn(self.conv(x))
        return Prediction(h.mean((2, 3)), h)


def _register(name: str) -> None:
    if Prediction not in pytree.SUPPORTED_NODES:
        pytree.register_dataclass(Prediction, serialized_type_name=name)


def _unregister() -> None:
    if Prediction in pytree.SUPPORTED_NODES:
        pytree._deregister_pytree_node(Prediction)


LIBRARY = """
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree


@dataclass
class ModelOutput:
    logits: torch.Tensor
    hidden: torch.Tensor


pytree.register_dataclass(ModelOutput, serialized_type_name=f"{__name__}.ModelOutput")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.bn(self.conv(x))
        return ModelOutput(h.mean((2, 3)), h)
"""


def test_pt2_with_a_library_dataclass_output_loads_by_importing_its_module(tmp_path, monkeypatch):
    (tmp_path / "fake_modellib.py").write_text(LIBRARY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_modellib

    path = tmp_path / "m.pt2"
    x = (torch.randn(1, 3, 8, 8),)
    torch.export.save(torch.export.export(fake_modellib.Net().eval(), x), path)
    pytree._deregister_pytree_node(fake_modellib.ModelOutput)  # as in a process that never imported it
    del sys.modules["fake_modellib"]
    try:
        with pytest.raises(BnrewriteError, match=r"fake_modellib\.ModelOutput.*import fake_modellib first"):
            load(path, auto_import=False)
        res = CliRunner().invoke(app, ["--no-import", "analyze", str(path)])
        assert res.exit_code == 1 and "--import fake_modellib" in res.output
        loaded = load(path)  # imports fake_modellib, which registers the type
        assert "fake_modellib" in sys.modules
        assert type(loaded.model.module()(*x)).__name__ == "ModelOutput"
    finally:
        lib = sys.modules.pop("fake_modellib", None)
        if lib is not None and lib.ModelOutput in pytree.SUPPORTED_NODES:
            pytree._deregister_pytree_node(lib.ModelOutput)


def test_fold_verify_fails_for_a_pt2_that_cannot_be_read_back(tmp_path):
    _unregister()
    _register("nowhere_to_be_found.Prediction")  # no module can register it in a new process
    try:
        model = randomize_bn(DataclassOut())
        x = (torch.randn(1, 3, 8, 8),)
        out = tmp_path / "folded.pt2"
        with pytest.raises(VerificationError, match="cannot be read back in a new process"):
            fold_and_write(Loaded(model, x, "test", "module"), out, x, verify=True)
        assert not out.exists() and not list(tmp_path.iterdir())
    finally:
        _unregister()


def test_onnx_mismatch_in_training_mode_says_to_use_eval(tmp_path):
    pytest.importorskip("onnxruntime")
    from bnrewrite import export

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    with pytest.raises(BnrewriteError, match=r"training mode.*--eval"):
        export(model, tmp_path / "m.onnx", (torch.randn(4, 3, 8, 8),))


class Rearrange(nn.Module):
    """An einops-style layer: parses shapes into Python ints, which symbolic_trace cannot."""

    def forward(self, x):
        b, c, h, w = (int(s) for s in x.shape)
        return x.reshape(b, c, h * w).transpose(1, 2)


class WithEinops(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.to_tokens = Rearrange()
        self.bn_tokens = nn.BatchNorm1d(4)

    def forward(self, x):
        t = self.to_tokens(self.bn(self.conv(x)))
        return self.bn_tokens(t.transpose(1, 2))


def test_fd203_names_the_fallback_and_suggests_leaf():
    model = randomize_bn(WithEinops())
    report = analyze(model)  # no inputs: torch.export cannot run, parts are fx-only
    root = next(o for o in report.opaque if o.module_path == "")
    assert "--leaf Rearrange" in root.reason
    leafed = analyze(model, leaf_modules=["Rearrange"])
    assert not leafed.opaque
    with_inputs = analyze(model, (torch.randn(2, 3, 8, 8),))
    assert with_inputs.opaque == [] or "torch.export" in with_inputs.opaque[0].reason
