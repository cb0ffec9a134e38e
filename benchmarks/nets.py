"""Third-party networks as factory specs for CLI benchmarks (``nets:densenet121``)."""

from __future__ import annotations

import torch
from monai.networks import nets

from samples._stats import trained


def densenet121() -> torch.nn.Module:
    torch.manual_seed(0)
    return trained(nets.DenseNet121(2, 1, 3, init_features=8, growth_rate=4))


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)),)
