"""Shared helpers: trained-looking BatchNorms and float64 references."""

from __future__ import annotations

import copy
import importlib
import os
import sys
import warnings

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

warnings.filterwarnings("ignore")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _timing_free_folds(request, monkeypatch):
    """Fold outcomes must not depend on this machine's timings: the speed check (FD108) sees
    every transposed conv bias as free, except in tests marked ``real_timing``."""
    from bnrewrite.plan import fold_cost

    monkeypatch.setattr(fold_cost, "_cache", {})
    if request.node.get_closest_marker("real_timing") is None:

        def free(layer, weight, in_shape, output_padding, bn_after, nominal):
            return fold_cost.Timing(1.0, 1.0, in_shape, nominal, str(weight.device))

        monkeypatch.setattr(fold_cost, "_measure", free)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking running stats and affine parameters; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
                m.num_batches_tracked.fill_(10)
                if m.affine:
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


def float64_reference(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        return ref(*(x.double() for x in inputs))


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert set(now) == set(snapshot)
    for k, v in snapshot.items():
        assert torch.equal(now[k], v), f"{k} was modified"


def load_sample(name: str):
    mod = importlib.import_module(f"samples.{name}")
    return mod.build(), mod.example_inputs()


@pytest.fixture
def sample():
    return load_sample
