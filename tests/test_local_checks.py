"""Every kind of local check catches a planted wrong fold of its own kind and names it, and
spares right folds (in-place user code included).

Each planted error is small: the folded weights off by a relative 1e-3. A check whose
tolerance were 1000x looser, or that were a no-op, would let it through - and then the final
comparison would undo every fold instead of naming this one, which these tests refuse too.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from bnrewrite import fold
from bnrewrite.rewrite_rules import bn_tree, fold_bn, merge_branches, norm_rest
from bnrewrite.verify import verify
from samples._stats import trained

OFF = 1e-3  # the planted error, relative


def _plant(monkeypatch, name: str, module=fold_bn, *, call: int = 0) -> None:
    """Make the ``call``-th weight computation of ``module.name`` off by ``OFF``."""
    real = getattr(module, name)
    seen = [0]

    @functools.wraps(real)
    def planted(*args, **kwargs):
        w, b = real(*args, **kwargs)
        seen[0] += 1
        if seen[0] - 1 == call:
            w = w * (1 + OFF)
            b = b * (1 + OFF) if b is not None else b
        return w, b

    monkeypatch.setattr(module, name, planted)


def _undone(report) -> list[str]:
    return [d.module_path for d in report.diagnostics if d.code == "FD207"]


def _assert_named(model, inputs, report, folded, path: str, what: str) -> None:
    undone = [d for d in report.diagnostics if d.code == "FD207"]
    assert [d.module_path for d in undone] == [path], [d.message for d in undone]
    assert what in undone[0].message
    assert report.actions, "the right folds stay"  # not everything undone by the final check
    assert verify(model, folded, inputs).passed


class Chain(nn.Module):
    """conv -> BN -> ReLU -> BN -> conv (no padding): one fold into the preceding conv, one
    into the following conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.bn2, self.conv2 = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.bn2(torch.relu(self.bn1(self.conv1(x)))))
        return self.bn3(self.conv3(torch.relu(y)))


def _chain():
    return trained(Chain()), (torch.randn(2, 3, 8, 8),)


def test_conv_then_bn_planted_wrong_is_named_by_the_layer_check(monkeypatch):
    model, inputs = _chain()
    _plant(monkeypatch, "_preceding")  # the first fold into a preceding conv: bn1
    folded, report = fold(model, inputs)
    _assert_named(model, inputs, report, folded, "bn1", "the folded layer differs")


def test_bn_then_conv_planted_wrong_is_named_by_the_layer_check(monkeypatch):
    model, inputs = _chain()
    _plant(monkeypatch, "_following")
    folded, report = fold(model, inputs)
    _assert_named(model, inputs, report, folded, "bn2", "the folded layer differs")


class Combined(nn.Module):
    """BN over a concat, BN over a sum of two convs of different inputs, a token Linear ->
    transpose -> BatchNorm1d, and a plain conv -> BN."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 2, 1)
        self.bn_cat = nn.BatchNorm2d(6)
        self.c, self.d = nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 3, padding=1)
        self.bn_sum = nn.BatchNorm2d(6)
        self.proj, self.bn_tok = nn.Linear(6, 5), nn.BatchNorm1d(5)
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn_cat(torch.cat([self.a(x), self.b(x)], 1)))
        h = torch.relu(self.bn_sum(self.c(h) + self.d(torch.tanh(h))))
        tokens = self.bn_tok(self.proj(h.flatten(2).transpose(1, 2)).transpose(1, 2))
        return tokens.mean() + self.bn(self.conv(x)).mean((1, 2, 3))


@pytest.mark.parametrize(
    "call, path",
    [(0, "bn_cat"), (2, "bn_sum"), (4, "bn_tok")],
    ids=["concat", "sum", "reshape"],
)
def test_combined_folds_planted_wrong_are_named(monkeypatch, call, path):
    model, inputs = trained(Combined()), (torch.randn(2, 3, 6, 6),)
    seen = []
    real = fold_bn._preceding
    monkeypatch.setattr(fold_bn, "_preceding", lambda *a: seen.append(a) or real(*a))
    fold(model, inputs, prove=False)
    assert len(seen) == 6  # cat: 2 pieces, sum: 2 terms, the Linear, the plain conv
    monkeypatch.setattr(fold_bn, "_preceding", real)
    _plant(monkeypatch, "_preceding", call=call)
    folded, report = fold(model, inputs)
    _assert_named(model, inputs, report, folded, path, "the folded layer differs")


def test_an_affine_site_planted_wrong_is_named(monkeypatch):
    from tests.conftest import load_sample

    model, inputs = load_sample("frozen_bn")
    _, plain = fold(model, inputs)
    assert plain.actions and not _undone(plain)
    first = plain.actions[0].module_path
    _plant(monkeypatch, "_preceding" if plain.actions[0].kind.endswith("preceding") else "_following")
    folded, report = fold(model, inputs)
    _assert_named(model, inputs, report, folded, first, "the folded layer differs")


def test_a_merged_block_planted_wrong_is_named_by_the_graph_check(monkeypatch):
    from tests.conftest import load_sample

    model, inputs = load_sample("repvgg")
    real = merge_branches._module
    seen = [0]

    def planted(bset):
        conv = real(bset)
        seen[0] += 1
        if seen[0] == 1:
            with torch.no_grad():
                conv.weight.mul_(1 + OFF)
        return conv

    monkeypatch.setattr(merge_branches, "_module", planted)
    folded, report = fold(model, inputs)
    undone = [d for d in report.diagnostics if d.code == "FD207"]
    blocks = {d.message.split(": fold undone: ")[1].split(" (graph)")[0] for d in undone}
    assert len(blocks) == 1 and len(undone) == 3, [d.message for d in undone]  # one block, its 3 BNs
    assert all("the folded graph differs" in d.message for d in undone)
    assert any(a.kind == "merge-branches" for a in report.actions)  # the other blocks stay merged
    assert verify(model, folded, inputs).passed


class _Scaled(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * (1 + OFF)


def test_the_rest_of_a_norm_module_planted_wrong_is_named_by_the_slot_check(monkeypatch):
    from samples.real_idioms import BatchNormAct2d

    model = trained(
        nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    )
    inputs = (torch.randn(2, 3, 8, 8),)
    real = norm_rest.rest_of

    def planted(*args, **kwargs):
        rest = real(*args, **kwargs)
        rest.module = _Scaled(rest.module) if rest.module is not None else None
        return rest

    monkeypatch.setattr(bn_tree, "rest_of", planted)
    folded, report = fold(model, inputs)
    _assert_named(model, inputs, report, folded, "1", "the module in the BatchNorm's place differs")


def test_right_folds_under_in_place_user_code_are_spared():
    from tests.conftest import load_sample

    model, inputs = load_sample("real_idioms")
    _, report = fold(model, inputs)
    assert not _undone(report) and report.extra["proof"]["local_checks"] >= 10
