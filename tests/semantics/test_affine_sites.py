"""Affine sites are found by what they compute: frozen BatchNorm of any spelling, Affine and
layer-scale layers fold alike in every capture dialect, and a look-alike is never silent."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from bnrewrite import analyze, export, fold
from bnrewrite.verify import verify
from tests.conftest import load_sample
from tests.rewrite_rules.test_norm_rest import ShapeDependent, close_to_float64


def _three_ways(name):
    model, inputs = load_sample(name)
    yield "symbolic_trace", model, model, inputs
    yield "torch.export", ShapeDependent(model).eval(), model, inputs
    yield "program", torch.export.export(model, inputs), model, inputs


def _folds(report) -> set[tuple[str, str]]:
    return {(a.module_path.removeprefix("net."), a.code) for a in report.actions}


FOLDS = {
    "frozen_bn": {("bn1", "FD101"), ("bn2", "FD101"), ("bn3", "FD101")},
    "affine_layers": {
        ("blocks.0.norm2", "FD102"),
        ("blocks.0.ls2", "FD101"),
        ("blocks.1.norm2", "FD102"),
        ("blocks.1.ls2", "FD101"),
    },
}


@pytest.mark.parametrize("name", sorted(FOLDS))
def test_every_dialect_gives_the_same_folds_verified_against_float64(name):
    for how, src, model, inputs in _three_ways(name):
        folded, report = fold(src, inputs)
        assert report.extra["capture"] == how
        assert _folds(report) == FOLDS[name], how
        close_to_float64(model, folded, inputs)


@pytest.mark.parametrize("name", sorted(FOLDS))
def test_the_pt2_written_by_fold_loads_back(name, tmp_path):
    model, inputs = load_sample(name)
    folded, _ = fold(model, inputs)
    path = tmp_path / "folded.pt2"
    export(folded, path, inputs)
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        assert torch.allclose(loaded(*inputs), folded(*inputs), atol=1e-6)
    assert verify(model, loaded, inputs).passed


def test_frozen_spellings_become_identity_in_the_users_tree():
    model, inputs = load_sample("frozen_bn")
    folded, _ = fold(model, inputs)
    assert type(folded) is type(model)
    assert all(type(getattr(folded, f"bn{i}")) is nn.Identity for i in (1, 2, 3))


def test_affine_layers_that_no_neighbour_absorbs_stay_with_their_reason():
    model, inputs = load_sample("affine_layers")
    folded, report = fold(model, inputs)
    assert type(folded.blocks[0].norm1).__name__ == "Affine"  # before the token-mixing Linear
    kept = {d.module_path: d for d in report.diagnostics if d.module_path and d.module_path.endswith("norm1")}
    assert "stays as it is (Affine, one op)" in kept["blocks.0.norm1"].message
    norms = {n.module_path: n for n in analyze(model, inputs).norms}
    assert norms["blocks.0.ls2"].family == "affine" and norms["blocks.0.ls2"].verdict == "fold-into-preceding"
    assert norms["blocks.0.norm1"].verdict == "not-foldable"


class FrozenBNSquare(nn.Module):
    """Named like a frozen BN, but squares its input: no per-channel affine map."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.rand(c) + 0.5)

    def forward(self, x):
        return x * x * self.scale[None, :, None, None]


class FrozenLookalikeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.frozen_bn = FrozenBNSquare(4)

    def forward(self, x):
        return self.frozen_bn(self.conv(x))


def test_a_lookalike_that_is_not_affine_gets_a_diagnostic_and_an_inventory_entry():
    model = FrozenLookalikeNet().eval()
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold(model, (x,))
    assert report.actions == []
    fd208 = [d for d in report.diagnostics if d.code == "FD208"]
    assert [d.module_path for d in fd208] == ["frozen_bn"] and "not an affine map" in fd208[0].message
    entry = next(n for n in analyze(model, (x,)).norms if n.module_path == "frozen_bn")
    assert entry.reason_code == "FD208" and entry.verdict == "not-foldable"
    assert isinstance(folded, nn.Module) and not isinstance(folded, fx.GraphModule)


class Spelled(nn.Module):
    """A frozen BatchNorm written one of many ways; all compute the same per-channel affine map."""

    def __init__(self, c: int, spelling: str) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.spelling = spelling
        self.register_buffer("weight", torch.rand(c, generator=g) + 0.5)
        self.register_buffer("bias", torch.randn(c, generator=g))
        self.register_buffer("running_mean", torch.randn(c, generator=g))
        self.register_buffer("running_var", torch.rand(c, generator=g) + 0.5)

    def forward(self, x):
        w, b = self.weight.view(1, -1, 1, 1), self.bias.view(1, -1, 1, 1)
        m, v = self.running_mean[None, :, None, None], self.running_var[None, :, None, None]
        if self.spelling == "sqrt":
            return (x - m) / torch.sqrt(v + 1e-5) * w + b
        if self.spelling == "pow":
            return (x - m) * (v + 1e-5).pow(-0.5) * w + b
        if self.spelling == "division":
            scale = w / (v + 1e-5) ** 0.5
            return x * scale + (b - m * scale)
        scale = w * torch.rsqrt(v + 1e-5)  # addcmul
        return torch.addcmul(b - m * scale, x, scale)


class SpelledNet(nn.Module):
    def __init__(self, spelling: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = Spelled(4, spelling)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


@pytest.mark.parametrize("spelling", ["sqrt", "pow", "division", "addcmul"])
def test_every_spelling_folds_in_both_capture_dialects(spelling):
    model = SpelledNet(spelling).eval()
    x = torch.randn(2, 3, 8, 8)
    for src in (model, torch.export.export(model, (x,))):
        folded, report = fold(src, (x,))
        assert [(a.module_path, a.code) for a in report.actions] == [("norm", "FD101")], spelling
        close_to_float64(model, folded, (x,))
