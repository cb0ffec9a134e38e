"""The idioms real model libraries write (samples/real_idioms.py, samples/container_slices.py):
in-place activations inside norm modules, shape asserts, ``x += y``, blocks built from branches
in ModuleLists with ``0 +`` placeholders, container slices. Every one folds or merges in the
user's tree, with no fold undone and no more ops than the library's own reparameterization."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from bnrewrite import analyze, fold
from bnrewrite.verify import verify
from tests.conftest import assert_unchanged, load_sample, state_snapshot
from tests.rewrite_rules.test_merge_branches import executed


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("as_program", [False, True], ids=["module", "export"])
def test_real_idioms_fold_and_merge_with_nothing_undone(as_program):
    model, inputs = load_sample("real_idioms")
    before = state_snapshot(model)
    x0 = inputs[0].clone()
    subject = torch.export.export(model, inputs) if as_program else model
    folded, report = fold(subject, inputs)
    codes = Counter(d.code for d in report.diagnostics)
    assert codes["FD207"] == 0 and codes["FD206"] == 0, [d.message for d in report.diagnostics]
    assert codes["FD109"] == 4  # RepVGG, MobileOne, RepMixer, RepViT blocks
    if not as_program:
        assert report.extra["proof"]["passed"] and not report.extra["proof"]["undone"]
    counts = executed(folded, inputs)
    assert not any("batch_norm" in k for k in counts)
    if not as_program:
        assert type(folded) is type(model) and _batchnorms(folded) == 0
    assert verify(model, folded, inputs).passed
    assert torch.equal(inputs[0], x0)  # in-place user code never wrote the caller's input
    assert_unchanged(model, before)


def test_real_idioms_run_no_more_ops_than_the_libraries_own_reparameterization():
    model, inputs = load_sample("real_idioms")
    from samples.real_idioms import reparameterize

    folded, _ = fold(model, inputs)
    ours, theirs = executed(folded, inputs), executed(reparameterize(model), inputs)
    assert sum(ours.values()) <= 1.05 * sum(theirs.values())
    assert ours["convolution"] <= theirs["convolution"]
    assert verify(model, reparameterize(model), inputs).passed  # the reference itself is right


def test_analyze_lists_the_branch_sets_behind_shape_asserts():
    model, inputs = load_sample("real_idioms")
    report = analyze(model, inputs)
    sets = {s["module"]: s["verdict"] for s in report.extra["branch_sets"]}
    assert sets["repvgg"] == sets["mobileone"] == sets["mixer"] == sets["repvit"] == "merge"


def test_in_place_activations_and_residuals_keep_every_right_fold():
    """``inplace=True`` activations after the BatchNorm, ``x += y``, ``relu_``, ``mul_``: the
    local checks compare values captured before the user's code wrote into them."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.act = nn.Hardswish(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.act(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y)).relu_()
            y.mul_(0.5)
            x += y
            return x

    from samples.real_idioms import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), BatchNormAct2d(4), Block(), Block())
    from samples._stats import trained

    model = trained(model)
    inputs = (torch.randn(2, 3, 8, 8),)
    folded, report = fold(model, inputs)
    assert not [d for d in report.diagnostics if d.code == "FD207"]
    assert _batchnorms(folded) == 0 and report.extra["proof"]["local_checks"] >= 5
    assert verify(model, folded, inputs).passed


def test_a_detector_iterating_slices_of_its_containers_keeps_its_class():
    model, inputs = load_sample("container_slices")
    folded, report = fold(model, inputs)
    assert type(folded) is type(model)
    assert not [d for d in report.diagnostics if d.code in ("FD104", "FD207")]
    run = executed(folded, inputs)
    assert not any("batch_norm" in k for k in run)
    assert verify(model, folded, inputs).passed


def test_a_called_slice_of_a_sequential_is_traced_through():
    from samples.container_slices import SlicingDetector, trained

    class Traceable(SlicingDetector):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.model[:-1](x)  # a Sequential the model does not hold
            for b in self.blocks[1:]:
                x = b(x)
            return self.model[-1](self.tail[1:](x))

    model, inputs = trained(Traceable()), (torch.randn(2, 3, 16, 16),)
    folded, report = fold(model, inputs)
    assert report.dialect == "module" and type(folded) is Traceable
    assert not any("batch_norm" in k for k in executed(folded, inputs))
    assert verify(model, folded, inputs).passed
