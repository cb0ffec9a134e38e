"""The proof: local checks name a wrong fold without bisection, a drift that no local check
explains is judged against float64, and a fold that did not take effect is never reported."""

from __future__ import annotations

import torch
from torch import nn

from bnrewrite import fold
from bnrewrite.editor.edit import Editor
from bnrewrite.rewrite_rules import bn_tree
from bnrewrite.rewrite_rules.norm_rest import Rest
from bnrewrite.verify import verify
from tests.conftest import load_sample, randomize_bn
from tests.rewrite_rules.test_norm_rest import batch_norms_run
from tests.test_driver import Mistraced

MAX_PASSES = 3  # the capture's eager pass, the proof run, one rerun after undoing


class TinyBranch(nn.Module):
    """A BatchNorm-with-ReLU whose branch moves the output by about 1e-6 of its size."""

    def __init__(self) -> None:
        super().__init__()
        from samples.bn_act import BatchNormAct2d

        self.main = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(4)

    def forward(self, x):
        return self.main(x) + 1e-6 * self.bn(self.conv(x))


def _drop_the_rest(*_args, **_kwargs) -> Rest:
    return Rest(nn.Identity())  # the old bug: every BatchNorm subclass treated as plain


def test_a_planted_fold_that_drops_an_activation_is_caught_and_undone(monkeypatch):
    model = randomize_bn(TinyBranch())
    x = torch.randn(2, 3, 8, 8)
    right, spared = fold(model, (x,))  # without the plant the same fold is kept
    assert not [d for d in spared.diagnostics if d.code == "FD207"] and type(right.bn) is not type(model.bn)
    monkeypatch.setattr(bn_tree, "rest_of", _drop_the_rest)  # the real planner, with the old bug
    folded, report = fold(model, (x,))
    undone = [d for d in report.diagnostics if d.code == "FD207"]
    assert [d.module_path for d in undone] == ["bn"]
    assert "the module in the BatchNorm's place differs" in undone[0].message
    assert type(folded.bn).__name__ == "BatchNormAct2d" and report.actions == []
    proof = report.extra["proof"]
    assert proof["forward_passes"] <= MAX_PASSES and proof["float64_passes"] == 0
    assert verify(model, folded, (x,)).passed


def test_the_planted_drift_is_below_the_global_tolerance(monkeypatch):
    """Why a local check is needed: the final outputs alone would accept the wrong fold."""
    model = randomize_bn(TinyBranch())
    x = torch.randn(2, 3, 8, 8)
    monkeypatch.setattr(bn_tree, "rest_of", _drop_the_rest)
    folded, _ = fold(model, (x,), prove=False)
    with torch.no_grad():
        ref, got = model(x), folded(x)
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert 1e-8 < rel < 1e-4  # moved by about 1e-6 relative: within the output tolerance


def test_enet_keeps_its_right_folds_where_float32_flips_decisions():
    model, inputs = load_sample("enet")
    folded, report = fold(model, inputs)
    proof = report.extra["proof"]
    assert len(report.actions) == 3 and not any(d.code == "FD207" for d in report.diagnostics)
    assert "judged_against_float64" in proof and proof["float64_passes"] == 1
    assert proof["forward_passes"] <= MAX_PASSES
    assert proof["max_abs_error"] > proof["tolerance"]  # the drift was real: max-unpool moved values
    assert verify(model, folded, inputs).passed


def test_a_drift_no_local_check_explains_is_judged_and_undone_without_bisection(monkeypatch):
    monkeypatch.setattr(bn_tree.TreePlanner, "_misread", lambda *_a: "")  # blind the eager check
    model = randomize_bn(Mistraced())
    x = torch.randn(2, 3, 8, 8)
    folded, report = fold(model, (x,))
    proof = report.extra["proof"]
    assert sorted(proof["undone"]) == ["bn", "bn2"]
    assert proof["forward_passes"] <= MAX_PASSES and proof["float64_passes"] == 1
    assert "against float64" in next(d.message for d in report.diagnostics if d.code == "FD207")
    assert verify(model, folded, (x,)).passed


def test_no_reported_fold_leaves_its_batchnorm_running():
    model, inputs = load_sample("list_blocks")
    folded, report = fold(model, inputs)
    assert len(report.actions) == 5 and batch_norms_run(model, inputs) == 5
    assert batch_norms_run(folded, inputs) == 0
    assert folded.branches[0].layers[1] is folded.branches[0].get_submodule("1")  # list and child agree
    assert model.norm_ref is model.fuse_bn and isinstance(model.branches[0].layers[1][1], nn.BatchNorm2d)


def test_a_fold_that_did_not_take_effect_is_undone_and_said(monkeypatch):
    """An editor that only knows registered children (the one before this check existed)."""
    original = Editor._index

    def registered_only(self):
        return {k: [h for h in v if h[0] == "module"] for k, v in original(self).items()}

    monkeypatch.setattr(Editor, "_index", registered_only)
    model, inputs = load_sample("list_blocks")
    folded, report = fold(model, inputs)
    missed = {d.module_path for d in report.diagnostics if d.code == "FD207"}
    assert missed == {"branches.0.1.1", "branches.1.1.1", "branches.2.1.1", "fuse_bn"}
    assert all("did not take effect" in d.message for d in report.diagnostics if d.code == "FD207")
    assert len(report.actions) == 1 and batch_norms_run(folded, inputs) == 4
    assert verify(model, folded, inputs).passed


def test_inplace_undo_restores_the_old_weights_from_disk(monkeypatch):
    """inplace=True writes folded weights into the model's own tensors before the proof; the
    old values wait in a temporary folder, and an undone fold gets them back bit for bit."""
    import os

    from bnrewrite import stash as stash_mod

    folders = []
    real = stash_mod.Stash.__init__

    def tracked(self):
        real(self)
        folders.append(self.folder)

    monkeypatch.setattr(stash_mod.Stash, "__init__", tracked)
    monkeypatch.setattr(bn_tree, "rest_of", _drop_the_rest)
    model = randomize_bn(TinyBranch()).eval()
    x = torch.randn(2, 3, 8, 8)
    want = model(x).detach()
    conv_weight = model.conv.weight
    before = conv_weight.detach().clone()
    folded, report = fold(model, (x,), inplace=True)
    assert folded is model and model.conv.weight is conv_weight  # same tensor object, same storage
    assert [d.module_path for d in report.diagnostics if d.code == "FD207"] == ["bn"]
    assert torch.equal(model.conv.weight, before)  # restored from the stash
    assert torch.allclose(model(x), want, atol=1e-6)
    assert folders and not any(os.path.exists(f) for f in folders)  # the stash is gone


def test_inplace_keeps_right_folds_in_the_same_tensors():
    model, inputs = load_sample("resnet")
    weights = {n: p for n, p in model.named_parameters() if n.endswith("conv1.weight")}
    ref = model(*inputs).detach()
    folded, report = fold(model, inputs, inplace=True)
    assert folded is model and report.extra["proof"]["passed"]
    assert all(model.get_parameter(n) is p for n, p in weights.items())
    assert torch.allclose(model(*inputs), ref, atol=1e-5)
