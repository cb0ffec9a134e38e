"""The norm-affine rule (FD112): folds where only Linear / conv layers read the norm, refuses
with the reason elsewhere, exact against float64, proven per layer, opt-in."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnrewrite import analyze, export, fold, load
from bnrewrite.rewrite_rules import norm_affine
from samples import transformer_blocks as tb
from tests.conftest import assert_unchanged, float64_reference, state_snapshot

FOLDED = {
    "vit.norm1": "vit.attn.q, vit.attn.k, vit.attn.v",
    "vit.norm2": "vit.mlp.0",
    "llama.input_norm": "llama.attn.q, llama.attn.k, llama.attn.v",
    "llama.post_norm": "llama.mlp.gate, llama.mlp.up",
    "stage.gn1": "stage.pw",
}
REFUSED = {
    "post.norm": "add_5 (add) reads its output",
    "head_norm": "the model returns its output",
    "stage.gn2": "stage.conv pads with zeros",
}


def _folded(model, inputs, **kw):
    return fold(model, inputs, norm_affine=True, **kw)


def test_transformer_blocks_fold_where_only_layers_read_the_norm():
    model, inputs = tb.build(), tb.example_inputs()
    snap = state_snapshot(model)
    folded, report = _folded(model, inputs)
    got = {a.module_path: a.target for a in report.actions if a.code == "FD112"}
    assert got == FOLDED
    refused = {d.module_path: d.message for d in report.diagnostics if d.code == "FD112"}
    assert set(refused) == set(REFUSED)
    for path, why in REFUSED.items():
        assert why in refused[path]
    assert report.extra["proof"]["passed"] and not report.extra["proof"]["undone"]
    assert type(folded) is type(model)
    assert folded.vit.norm1.weight is None and folded.vit.norm1.elementwise_affine is False
    assert folded.stage.gn1.weight is None and folded.stage.gn1.affine is False
    assert torch.equal(folded.llama.input_norm.weight, torch.ones(tb.DIM))  # no class of torch's: weight 1
    assert folded.post.norm.weight is not None  # refused: untouched
    assert_unchanged(model, snap)


def test_fold_is_exact_against_float64():
    model, inputs = tb.build().double(), tuple(x.double() for x in tb.example_inputs())
    folded, _ = _folded(model, inputs)
    want = float64_reference(model, *inputs)
    with torch.no_grad():
        got = folded(*inputs)
    for w, g in zip(want, got):
        assert (w - g).abs().max() < 1e-12


def test_float32_fold_stays_within_float32_rounding_of_float64():
    model, inputs = tb.build(), tb.example_inputs()
    folded, _ = _folded(model, inputs)
    want = float64_reference(model, *inputs)
    with torch.no_grad():
        got, own = folded(*inputs), model(*inputs)
    for w, g, o in zip(want, got, own):
        assert (w - g.double()).abs().max() <= 4 * (w - o.double()).abs().max() + 1e-6


def test_opt_in_only():
    model, inputs = tb.build(), tb.example_inputs()
    folded, report = fold(model, inputs)
    assert not any(a.code == "FD112" for a in report.actions)
    assert not any(d.code == "FD112" for d in report.diagnostics)
    assert folded.vit.norm1.weight is not None


def test_local_check_catches_a_wrong_fold(monkeypatch):
    """Planted: the readers absorb the scale twice. The proof names the fold and undoes it."""
    right = norm_affine._folded

    def twice(layer, scale, shift):
        return right(layer, scale * scale, shift)

    monkeypatch.setattr(norm_affine, "_folded", twice)
    model, inputs = tb.build(), tb.example_inputs()
    folded, report = _folded(model, inputs)
    undone = {d.module_path for d in report.diagnostics if d.code == "FD207"}
    assert set(FOLDED) <= undone
    assert not any(a.code == "FD112" for a in report.actions)
    with torch.no_grad():
        for w, g in zip(model(*inputs), folded(*inputs)):
            assert torch.allclose(w, g, atol=1e-5)


def test_norm_check_catches_an_affine_left_on(monkeypatch):
    """Planted: the norm's weight becomes 2, not 1, while the readers absorb the affine."""

    def doubled(m):
        weight = m.module._parameters[m.weight]
        return norm_affine.SetEdit(m.path, {m.weight: nn.Parameter(2 * torch.ones_like(weight))})

    monkeypatch.setattr(norm_affine, "_identity", doubled)
    model, inputs = tb.build(), tb.example_inputs()
    _, report = _folded(model, inputs)
    failures = [d.message for d in report.diagnostics if d.code == "FD207"]
    assert any("the norm with its affine taken out" in f for f in failures)


def test_dry_run_and_analyze_show_the_plan():
    model, inputs = tb.build(), tb.example_inputs()
    snap = state_snapshot(model)
    plan = _folded(model, inputs, dry_run=True)
    assert plan.model is model
    steps = {tuple(s.folds): s for s in plan.report.plan.steps}
    assert set(steps[("vit.norm1",)].weights) == {"vit.attn.q", "vit.attn.k", "vit.attn.v", "vit.norm1"}
    report = analyze(model, inputs, norm_affine=True)
    verdicts = {e.module_path: (e.verdict, e.reason_code) for e in report.norms}
    for path in FOLDED:
        assert verdicts[path] == ("norm-affine", "FD112")
    assert "affine stays: stage.conv pads with zeros" in next(
        e.reason for e in report.norms if e.module_path == "stage.gn2"
    )
    assert not any(d.code == "FD208" for d in report.diagnostics)  # the RMSNorm is no mere look-alike
    assert_unchanged(model, snap)


def test_inplace_writes_the_users_model():
    model, inputs = tb.build(), tb.example_inputs()
    want = float64_reference(model, *inputs)
    q = model.vit.attn.q.weight
    folded, _ = _folded(model, inputs, inplace=True)
    assert folded is model and model.vit.norm1.weight is None
    assert model.vit.attn.q.weight is q  # same parameter object, new values
    with torch.no_grad():
        for w, g in zip(want, model(*inputs)):
            assert (w - g.double()).abs().max() < 1e-4


def test_state_dict_round_trips_into_the_factory(tmp_path):
    model, inputs = tb.build(), tb.example_inputs()
    folded, _ = _folded(model, inputs)
    path = tmp_path / "folded.pt"
    export(folded, path)
    loaded = load("samples.transformer_blocks:build", weights=path).model
    assert loaded.vit.norm1.weight is None
    with torch.no_grad():
        for w, g in zip(folded(*inputs), loaded(*inputs)):
            assert torch.equal(w, g)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.norm(x)) + self.norm.weight


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.norm(x)) + self.fc(x)


class _WrongAxis(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.GroupNorm(2, 4), nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(self.norm(x))


class _Functional(nn.Module):
    """A user's module calling F.layer_norm on its own parameters."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.rand(8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(F.layer_norm(x, (8,), self.weight, self.bias))


@pytest.mark.parametrize(
    ("model", "shape", "why"),
    [
        (_Tied(), (2, 8), "other code reads its affine parameters"),
        (_Twice(), (2, 8), "fc runs 2 times"),
        (_WrongAxis(), (2, 4, 6), "fc reads the last axis; the affine is on the channel axis"),
    ],
)
def test_refused_with_the_reason(model, shape, why):
    nn.init.uniform_(model.norm.weight, 0.5, 1.5)
    x = torch.randn(*shape)
    folded, report = fold(model.eval(), (x,), norm_affine=True)
    refused = [d.message for d in report.diagnostics if d.code == "FD112"]
    assert len(refused) == 1 and why in refused[0], refused
    assert folded.norm.weight is not None


def test_functional_norm_on_module_parameters_folds_to_weight_one():
    model = _Functional().eval()
    x = torch.randn(3, 8)
    want = float64_reference(model, x)
    folded, report = fold(model, (x,), norm_affine=True)
    assert [a.target for a in report.actions if a.code == "FD112"] == ["fc"]
    assert torch.equal(folded.weight, torch.ones(8)) and torch.equal(folded.bias, torch.zeros(8))
    with torch.no_grad():
        assert (folded(x).double() - want).abs().max() < 1e-5


def test_batchnorm_folds_and_norm_affine_do_not_collide():
    """A Linear that also absorbs a BatchNorm is refused for the norm affine (one fold per layer)."""
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.BatchNorm1d(8)).eval()
    nn.init.uniform_(model[0].weight, 0.5, 1.5)
    model[2].running_var.fill_(2.0)
    x = torch.randn(4, 8)
    want = float64_reference(model, x)
    folded, report = fold(copy.deepcopy(model), (x,), norm_affine=True)
    assert any(d.code == "FD112" and "another fold changes it" in d.message for d in report.diagnostics)
    with torch.no_grad():
        assert (folded(x).double() - want).abs().max() < 1e-5


class _ScaledBySqrt(nn.Module):
    """A scale by a parameter after ``rsqrt`` of a constant: no reduction, so no norm."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(torch.tensor(2.0)))


def test_only_what_normalizes_is_a_norm():
    """Planted look-alikes: a layer scale (``x * gamma``) and a scale after ``rsqrt`` of a constant
    are no norms: the rule neither folds nor refuses them (the layer scale folds as an affine site)."""
    for first in (_ScaledBySqrt(), tb.RMSNorm(8)):
        model = nn.Sequential(first, nn.Linear(8, 8)).eval()
        _, report = fold(model, (torch.randn(2, 8),), norm_affine=True)
        fd112 = [a for a in report.actions if a.code == "FD112"] + [
            d for d in report.diagnostics if d.code == "FD112"
        ]
        assert bool(fd112) == isinstance(first, tb.RMSNorm), fd112


class _ExportOnly(nn.Module):
    """A branch on a traced size: symbolic_trace cannot read it, torch.export can (ATen ops)."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 6)

    def forward(self, x):
        y = self.fc(self.norm(x))
        return y[..., :3] if x.shape[-1] % 2 == 0 else y


def test_aten_graph_folds_into_the_modules_whose_weights_its_ops_apply():
    model = _ExportOnly()
    nn.init.uniform_(model.norm.weight, 0.5, 1.5)
    nn.init.uniform_(model.norm.bias, -0.5, 0.5)
    x = torch.randn(3, 5, 8)
    want = float64_reference(model.eval(), x)
    folded, report = fold(model, (x,), norm_affine=True)
    assert report.extra["capture"] == "torch.export"
    assert [(a.module_path, a.target) for a in report.actions if a.code == "FD112"] == [("norm", "fc")]
    assert type(folded) is _ExportOnly and folded.norm.weight is None
    with torch.no_grad():
        assert (folded(x).double() - want).abs().max() < 1e-5


class _TiedHead(nn.Module):
    """GPT-style: the final norm feeds an LM head whose weight is the token embedding's."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Embedding(11, 8), nn.LayerNorm(8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.norm(self.embed(tokens)))


@pytest.mark.parametrize("inplace", [False, True])
def test_a_tied_reader_is_refused(inplace):
    """Folding into the head would write the embedding too (in place: after the proof)."""
    model = _TiedHead().eval()
    nn.init.uniform_(model.norm.weight, 0.5, 1.5)
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        want = copy.deepcopy(model).double()(tokens)
    snap = model.embed.weight.detach().clone()
    folded, report = fold(model, (tokens,), norm_affine=True, inplace=inplace)
    refused = [d.message for d in report.diagnostics if d.code == "FD112"]
    assert len(refused) == 1 and "tied" in refused[0], refused
    assert torch.equal(folded.embed.weight, snap) and folded.head.weight is folded.embed.weight
    with torch.no_grad():
        assert (folded(tokens).double() - want).abs().max() < 1e-5


class _LayerNorm2d(nn.LayerNorm):
    """A channels-first LayerNorm the way vision libraries write it: permute, layer_norm, permute."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _ConvNeXtStage(nn.Module):
    def __init__(self, padding: int):
        super().__init__()
        self.norm = _LayerNorm2d(8)
        self.conv = nn.Conv2d(8, 6, 1 if padding == 0 else 3, padding=padding)

    def forward(self, x):
        return self.conv(self.norm(x))


@pytest.mark.parametrize("padding", [0, 1])
def test_channels_first_layernorm_is_followed_through_its_permutes(padding):
    model = _ConvNeXtStage(padding).eval()
    nn.init.uniform_(model.norm.weight, 0.5, 1.5)
    nn.init.uniform_(model.norm.bias, -0.5, 0.5)
    x = torch.randn(2, 8, 5, 5)
    want = float64_reference(model, x)
    folded, report = fold(model, (x,), norm_affine=True)
    done = [a.target for a in report.actions if a.code == "FD112"]
    refused = [d.message for d in report.diagnostics if d.code == "FD112"]
    if padding:
        assert not done and "pads with zeros" in refused[0]
    else:
        assert done == ["conv"] and report.extra["proof"]["passed"] and not report.extra["proof"]["undone"]
        assert torch.equal(folded.norm.weight, torch.ones(8))  # its own forward: weight 1, bias 0
    with torch.no_grad():
        assert (folded(x).double() - want).abs().max() < 1e-5
