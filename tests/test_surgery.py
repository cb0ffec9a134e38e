"""swap / insert / remove / fix: function preserved where claimed, trainable, affine kept."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnrewrite.modules import ChannelwiseLayerNorm, FrozenBatchNorm
from bnrewrite.surgery import fix, insert, remove, swap
from bnrewrite.surgery.norm_factory import default_groups
from tests.conftest import assert_unchanged, load_sample, randomize_bn, state_snapshot


def conv_net(affine: bool = True) -> nn.Module:
    return randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12, affine=affine), nn.ReLU(), nn.Conv2d(12, 4, 1)
        )
    )  # fmt: skip


def x_img() -> tuple[torch.Tensor]:
    return (torch.randn(4, 3, 8, 8),)


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    """One optimizer step works and gradients reach every norm layer's parameters."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    norms = [
        m
        for m in model.modules()
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase, ChannelwiseLayerNorm))
    ]
    for m in norms:
        if getattr(m, "weight", None) is not None and isinstance(m.weight, nn.Parameter):
            assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all()


@pytest.mark.parametrize(
    "to,cls,exact",
    [
        ("gn", nn.GroupNorm, False),
        ("ln", nn.GroupNorm, False),
        ("in", nn.InstanceNorm2d, False),
        ("frozen", FrozenBatchNorm, True),
        ("sync", nn.SyncBatchNorm, True),
    ],
)
def test_swap_from_batchnorm(to, cls, exact):
    model = conv_net()
    snap = state_snapshot(model)
    new, report = swap(model, to, example_inputs=x_img())
    assert_unchanged(model, snap)
    assert type(new) is type(model)  # module swaps keep the user's model class
    swapped = new[1]
    assert isinstance(swapped, cls)
    assert report.actions[0].exact is exact
    if to != "frozen":  # learned affine kept
        torch.testing.assert_close(swapped.weight.detach().flatten(), model[1].weight.detach())
        torch.testing.assert_close(swapped.bias.detach().flatten(), model[1].bias.detach())
    if exact:
        assert report.verification["passed"]
    else:
        assert report.extra["deviation"]["max_abs"] > 0 and "SW002" in report.codes()
    x = x_img()[0]
    assert new(x).shape == model(x).shape
    if to != "sync":  # SyncBatchNorm trains only inside a process group
        train_step(new, x)


def test_default_groups_and_degenerate_groupnorm_is_refused():
    assert default_groups(64) == 32 and default_groups(48) == 24 and default_groups(7) == 7
    mlp = randomize_bn(nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)))
    new, report = swap(mlp, "gn", groups=6, example_inputs=(torch.randn(4, 8),))
    assert report.codes() == ["SW001"] and "1 value per group" in report.diagnostics[0].message
    assert isinstance(new[1], nn.BatchNorm1d)
    new, report = swap(mlp, "gn", groups=2, example_inputs=(torch.randn(4, 8),))
    assert isinstance(new[1], nn.GroupNorm) and new[1].num_groups == 2


def test_layernorm_dims_are_explicit():
    model = conv_net()
    _, report = swap(model, "ln", example_inputs=x_img())
    assert "C,H,W" in report.actions[0].detail
    new, report = swap(model, "ln", ln_dims="c", example_inputs=x_img())
    assert (
        isinstance(new[1], ChannelwiseLayerNorm)
        and "channel dim at each position" in report.actions[0].detail
    )
    x = x_img()[0]
    want = F.layer_norm(model[0](x).movedim(1, -1), (12,), new[1].weight, new[1].bias, new[1].eps).movedim(
        -1, 1
    )
    torch.testing.assert_close(new[1](model[0](x)), want)


@pytest.mark.parametrize("source", ["gn", "in", "ln_c"])
def test_swap_to_batchnorm_keeps_affine_and_trains(source):
    model = conv_net()
    if source == "ln_c":
        mid, _ = swap(model, "ln", ln_dims="c", example_inputs=x_img())
    else:
        mid, _ = swap(model, source, example_inputs=x_img())
    with torch.no_grad():
        mid[1].weight.mul_(1.5)
    back, report = swap(mid, "bn", example_inputs=x_img())
    assert isinstance(back[1], nn.BatchNorm2d)
    torch.testing.assert_close(back[1].weight.detach(), mid[1].weight.detach().flatten())
    assert report.actions[0].exact is False
    train_step(back, x_img()[0])


def test_sync_and_frozen_back_to_batchnorm_are_exact():
    model = conv_net()
    synced, _ = swap(model, "sync", example_inputs=x_img())
    back, report = swap(synced, "bn", example_inputs=x_img())
    assert type(back[1]) is nn.BatchNorm2d and report.verification["passed"]
    frozen, _ = swap(model, "frozen", example_inputs=x_img())
    back, report = swap(frozen, "bn", example_inputs=x_img())
    assert type(back[1]) is nn.BatchNorm2d and report.verification["passed"]


def test_affine_false_and_functional_batchnorm():
    new, report = swap(conv_net(affine=False), "gn", example_inputs=x_img())
    assert isinstance(new[1], nn.GroupNorm)
    model, inputs = load_sample("functional_bn")
    new, report = swap(model, "frozen", example_inputs=inputs)
    assert len(report.actions) == 2 and report.verification["passed"]
    assert not any("batch_norm" in str(n.target) for n in new.graph.nodes if n.op == "call_function")
    new, report = swap(torch.export.export(model, inputs), "gn", example_inputs=inputs)
    assert len(report.actions) == 2 and "deviation" in report.extra


def test_selection_by_glob_and_type():
    model, inputs = load_sample("resnet")
    _, report = swap(model, "gn", select="layers.0.*", example_inputs=inputs)
    assert sorted(a.module_path for a in report.actions) == ["layers.0.bn1", "layers.0.bn2"]
    _, report = swap(
        model, "frozen", types=["BatchNorm2d"], select=["bn1", "layers.5.*"], example_inputs=inputs
    )
    assert sorted(a.module_path for a in report.actions) == ["bn1", "layers.5.bn1", "layers.5.bn2"]


def test_bn_to_groupnorm_sample_trains_and_loss_goes_down():
    torch.manual_seed(0)
    model, inputs = load_sample("resnet")
    new, _ = swap(model, "gn", example_inputs=inputs)
    new.train()
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    opt = torch.optim.Adam(new.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(new(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


@pytest.mark.parametrize("position", ["pre-act", "post-act"])
def test_insert_is_identity_in_eval(position):
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5)
    ).eval()
    x = (torch.randn(2, 3, 8, 8),)
    new, report = insert(model, position=position, example_inputs=x)
    expected = 2 if position == "post-act" else 3  # the Linear has no activation after it
    assert len(report.actions) == expected and report.verification["passed"]
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in new.modules()) == expected
    torch.testing.assert_close(new(*x), model(*x))
    train_step(new, x[0])


def test_insert_skips_layers_that_already_have_a_norm():
    model, inputs = load_sample("resnet")
    _, report = insert(model, example_inputs=inputs)
    assert [a.module_path for a in report.actions] == ["fc"]


def test_remove_reports_the_change():
    model, inputs = load_sample("resnet")
    new, report = remove(model, select="layers.*.bn2", example_inputs=inputs)
    assert len(report.actions) == 6 and report.extra["deviation"]["max_abs"] > 0
    assert isinstance(new.layers[0].bn2, nn.Identity) and isinstance(model.layers[0].bn2, nn.BatchNorm2d)


def test_fix_redundant_bias_is_exact_in_eval_and_training():
    model, inputs = load_sample("unet3d")
    new, report = fix(model, example_inputs=inputs)
    assert len(report.actions) == 7 and report.verification["passed"]  # 5 convs + 2 ConvTranspose3d
    assert new.enc1[3].bias is None and model.enc1[3].bias is not None
    x = inputs[0]
    a, b = copy.deepcopy(model).train(), copy.deepcopy(new).train()
    torch.testing.assert_close(b(x), a(x), rtol=1e-4, atol=1e-5)  # batch stats cancel the bias
    torch.testing.assert_close(
        b.enc1[4].running_mean, a.enc1[4].running_mean - model.enc1[3].bias.detach(), rtol=1e-5, atol=1e-6
    )


def test_fix_refuses_unknown_codes_and_shared_convs():
    from bnrewrite.errors import UsageError

    with pytest.raises(UsageError):
        fix(conv_net(), ["BN006"])
    model, inputs = load_sample("shared_conv")
    _, report = fix(model, example_inputs=inputs)
    assert report.actions == [] and set(report.codes()) == {"SW001"}


def test_surgery_replaces_only_the_smallest_module_around_a_graph_edit():
    from torch import fx

    from tests.test_driver import Outer

    model = randomize_bn(Outer())
    x = torch.randn(2, 3, 10, 10)
    swapped, report = swap(model, "frozen", example_inputs=x)
    assert type(swapped) is Outer and swapped.helper() == "still mine"
    assert isinstance(swapped.inner, fx.GraphModule) and not isinstance(swapped.bn, fx.GraphModule)
    assert [d.module_path for d in report.diagnostics if d.code == "FD104"] == ["inner"]
    removed, report = remove(model, example_inputs=x)
    assert type(removed) is Outer and isinstance(removed.inner, fx.GraphModule)
    assert type(removed.bn) is nn.Identity


def test_fix_takes_codes_by_keyword_as_documented():
    from bnrewrite import codes as catalogue

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 8, 8)
    assert "fix(model, codes=['BN001'])" in catalogue.get("BN001").explanation
    fixed, report = fix(model, codes=["BN001"], example_inputs=(x,))
    assert [a.code for a in report.actions] == ["BN001"] and fixed[0].bias is None


def test_every_surgery_can_show_its_edits_without_making_them():
    from bnrewrite import fix, insert, remove, swap
    from tests.conftest import assert_unchanged, load_sample, state_snapshot

    model, inputs = load_sample("resnet")
    snap = state_snapshot(model)
    for op in (
        lambda m: swap(m, "gn", example_inputs=inputs, dry_run=True),
        lambda m: remove(m, example_inputs=inputs, dry_run=True),
        lambda m: insert(m, "linear", example_inputs=inputs, dry_run=True),
        lambda m: fix(m, example_inputs=inputs, dry_run=True),
    ):
        result = op(model)
        assert result.model is model and result.report.plan is not None
        assert "plan" in result.report.to_dict()["extra"]
    plan = swap(model, "gn", example_inputs=inputs, dry_run=True).report.plan.steps
    assert plan and all(step.becomes == "GroupNorm" for step in plan)
    assert {s.module for s in plan} == {
        a.module_path for a in swap(model, "gn", example_inputs=inputs).report.actions
    }
    assert_unchanged(model, snap)
