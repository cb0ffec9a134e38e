"""Folds land in the user's own module tree; a graph only where no module edit expresses it."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import samples
import samples.dbb
from bnrewrite import fold
from bnrewrite.plan.steps import EditStep
from bnrewrite.semantics.norms import is_batchnorm_module
from bnrewrite.verify import verify
from tests.conftest import assert_unchanged, float64_reference, load_sample, randomize_bn, state_snapshot


def _folded_paths(report) -> set[str]:
    return {a.module_path for a in report.actions if a.kind.startswith("fold") and a.module_path}


def test_sequential_comes_back_as_a_sequential_without_batchnorm():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()))
    x = torch.randn(2, 3, 8, 8)
    snap = state_snapshot(model)
    folded, report = fold(model, (x,))
    assert type(folded) is nn.Sequential
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert type(folded[1]) is nn.Identity and folded[0].bias is not None
    assert set(folded.state_dict()) == {"0.weight", "0.bias"}
    assert folded[2] is model[2]  # untouched modules are shared, not copied
    assert_unchanged(model, snap)
    assert isinstance(model[1], nn.BatchNorm2d) and model[0].bias is None
    proof = report.extra["proof"]
    assert proof["passed"] and proof["forward_passes"] == 2  # the capture's eager pass + one proof run
    assert proof["float64_passes"] == 0 and proof["local_checks"] == 1  # the folded conv against conv + BN


@pytest.mark.parametrize("name", samples.NAMES)
def test_every_sample_is_the_users_class_with_no_batchnorm_where_folded(name):
    model, inputs = load_sample(name)
    folded, report = fold(model, inputs)
    graphs = [d.module_path or "" for d in report.diagnostics if d.code == "FD104"]
    if "" not in graphs:
        assert type(folded) is type(model)
        assert inspect.signature(folded.forward) == inspect.signature(model.forward)
    for path in _folded_paths(report):
        if not any(g == "" or path == g or path.startswith(g + ".") for g in graphs):
            module = folded.get_submodule(path)
            if "keeps the rest of its forward" in next(
                a.detail for a in report.actions if a.module_path == path
            ):
                assert type(module) is nn.Sequential, path  # its own activation etc., nothing else
                assert not any(is_batchnorm_module(m) for m in module.modules()), path
            else:
                assert type(module) is nn.Identity, path
    kept = {d.module_path for d in report.diagnostics if d.code.startswith(("FD2", "BN0"))}
    left = {
        p for p, m in folded.named_modules() if is_batchnorm_module(m) and not isinstance(m, fx.GraphModule)
    }
    assert left <= kept  # a BatchNorm is left only where the report says why (e.g. FD203, FD201)
    assert verify(model, folded, inputs).passed


def test_parent_that_iterates_and_type_checks_its_sequential_still_runs():
    model, inputs = load_sample("iterating_parent")
    folded, report = fold(model, inputs)
    assert type(folded.blocks) is nn.Sequential
    assert all(type(b).__name__ == "Residual" for b in folded.blocks)
    assert len(report.actions) == 4
    assert torch.allclose(folded(*inputs), model(*inputs), atol=1e-5)


def test_kwargs_and_dataclass_output_are_kept():
    model, inputs = load_sample("kwargs_dataclass")
    folded, _ = fold(model, inputs)
    out = folded(*inputs, return_features=False)
    assert type(out).__name__ == "Output" and out.features is None
    assert torch.allclose(out.logits, model(*inputs).logits, atol=1e-5)


class Inner(nn.Module):
    """Applies BatchNorm functionally on its own buffers."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.register_buffer("mean", torch.randn(c))
        self.register_buffer("var", torch.rand(c) + 0.5)

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.mean, self.var, training=False)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.inner = Inner(4)

    def helper(self) -> str:
        return "still mine"

    def forward(self, x):
        return self.inner(torch.relu(self.bn(self.stem(x))))


def test_functional_batchnorm_replaces_only_its_smallest_enclosing_module():
    model = randomize_bn(Outer())
    x = torch.randn(2, 3, 10, 10)
    folded, report = fold(model, (x,))
    assert type(folded) is Outer and folded.helper() == "still mine"
    assert type(folded.bn) is nn.Identity
    assert isinstance(folded.inner, fx.GraphModule)
    fd104 = [d for d in report.diagnostics if d.code == "FD104"]
    assert [d.module_path for d in fd104] == ["inner"] and "functional batch_norm" in fd104[0].message
    assert len(report.actions) == 2
    assert verify(model, folded, (x,)).passed


def test_shared_conv_is_carried_by_a_graph_and_says_why():
    model, inputs = load_sample("shared_conv")
    folded, report = fold(model, inputs)
    fd104 = next(d for d in report.diagnostics if d.code == "FD104")
    assert "shared between call sites" in fd104.message
    assert not any(is_batchnorm_module(m) for m in folded.modules())
    assert verify(model, folded, inputs).passed


def test_inplace_edits_the_model_itself_keeping_parameter_objects():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x).detach()
    weight = model[0].weight
    folded, _ = fold(model, (x,), inplace=True)
    assert folded is model and type(model[1]) is nn.Identity
    assert model[0].weight is weight  # same Parameter object, folded values in its storage
    assert torch.allclose(model(x), expected, atol=1e-5)


class Mistraced(nn.Module):
    """``torch.jit.isinstance`` is False on a tracer proxy: the trace drops the skip connection
    that also reads the conv's output, so the graph says the fold is safe when it is not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        out = self.bn(y)
        if torch.jit.isinstance(y, torch.Tensor):
            out = out + y
        return self.bn2(self.conv2(out))


def test_the_eager_run_refuses_exactly_the_fold_the_trace_got_wrong():
    model = randomize_bn(Mistraced())
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold(model, (x,))
    undone = [d for d in report.diagnostics if d.code == "FD207"]
    assert [d.module_path for d in undone] == ["bn"]
    assert "conv's output is read 2 times" in undone[0].message
    assert isinstance(folded.bn, nn.BatchNorm2d) and type(folded.bn2) is nn.Identity
    assert [a.module_path for a in report.actions] == ["bn2"]
    assert report.extra["proof"]["passed"] and report.extra["proof"]["forward_passes"] == 2
    assert verify(model, folded, (x,)).passed


def test_without_inputs_the_tree_is_folded_and_the_report_says_it_was_not_run():
    model, _ = load_sample("resnet")
    folded, report = fold(model)
    assert type(folded) is type(model) and report.extra["proof"]["passed"] is None


def test_dry_run_returns_the_plan_and_changes_nothing():
    model, inputs = load_sample("bn_act")
    snap = state_snapshot(model)
    same, report = fold(model, inputs, dry_run=True)
    assert same is model and type(model.stem.bn).__name__ == "BatchNormAct2d"
    assert_unchanged(model, snap)
    plan = report.plan.steps
    assert plan[0] == EditStep(["stem.bn"], {"stem.bn": "Sequential(ReLU)"}, ["stem.conv"])
    assert report.to_dict()["extra"]["plan"][0] == {
        "folds": ["stem.bn"],
        "modules": {"stem.bn": "Sequential(ReLU)"},
        "weights": ["stem.conv"],
    }
    assert "proof" not in report.extra  # nothing ran
    _, real = fold(model, inputs)
    assert [(a.module_path, a.code) for a in real.actions] == [
        (a.module_path, a.code) for a in report.actions
    ]


def test_dry_run_names_the_graph_replacements():
    model, inputs = load_sample("functional_bn")
    _, report = fold(model, inputs, dry_run=True)
    assert report.plan.steps[0].graph == "<root>"
    assert any(d.code == "FD104" and "would be replaced" in d.message for d in report.diagnostics)


def test_a_batchnorm_whose_tensors_other_code_reads_is_carried_by_a_graph():
    """DBB's BatchNorm-and-pad reads ``self.bn.bias`` to pad with: replacing that BatchNorm by
    ``Identity`` would break it, so the fold is carried by the enclosing module's graph."""
    model, inputs = samples.dbb.build(), samples.dbb.example_inputs()
    folded, report = fold(model, inputs, merge_branches=False)
    assert not [d for d in report.diagnostics if d.code == "FD207"]
    graphs = [d.message for d in report.diagnostics if d.code == "FD104"]
    assert graphs and all("stored tensors" in m for m in graphs)
    assert sum(a.kind == "fold-into-preceding" for a in report.actions) == 15
    assert verify(model, folded, inputs).passed


class _TiedConvs(nn.Module):
    """Two conv modules holding one weight parameter; only the first is followed by a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 4, 1, bias=False)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) * self.b(x)  # (a product: no branch merge)


def test_inplace_never_writes_a_parameter_another_module_holds():
    """Planted: a tied weight. ``inplace=True`` writes folded values into existing tensors after
    the proof; the other module's copy of the weight must keep its values."""
    model = randomize_bn(_TiedConvs()).eval()
    x = torch.randn(2, 4, 5, 5)
    want = float64_reference(model, x)
    folded, report = fold(model, (x,), inplace=True)
    assert report.extra["proof"]["passed"]
    with torch.no_grad():
        assert (folded(x).double() - want).abs().max() < 1e-5


def test_inplace_commit_keeps_a_tied_parameter_for_its_other_module(monkeypatch):
    """Planted: the norm-affine rule blinded to tied weights folds into an LM head that shares
    the embedding's weight; the commit after the proof must not write the shared tensor."""
    from bnrewrite.semantics.captured import Capture
    from tests.rewrite_rules.test_norm_affine import _TiedHead

    monkeypatch.setattr(Capture, "tied_parameters", lambda self: set())
    model = _TiedHead().eval()
    nn.init.uniform_(model.norm.weight, 0.5, 1.5)
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.no_grad():
        want = model(tokens).double()
    snap = model.embed.weight.detach().clone()
    folded, report = fold(model, (tokens,), norm_affine=True, inplace=True)
    assert [a.code for a in report.actions] == ["FD112"]
    assert torch.equal(model.embed.weight, snap)  # the embedding kept its values
    with torch.no_grad():
        assert (folded(tokens).double() - want).abs().max() < 1e-4
