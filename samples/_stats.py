"""Give sample models trained-looking BatchNorm statistics, deterministically."""

from __future__ import annotations

import torch
from torch import nn


def trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights, running stats and affine params; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                m.num_batches_tracked.fill_(100)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return model.eval()
