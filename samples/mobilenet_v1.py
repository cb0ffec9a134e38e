"""MobileNetV1 (13 depthwise-separable blocks, widths 32..1024, ReLU, 100 classes) with the
statistics a trained network has and that make per-tensor int8 weights lossy after folding:
running_var log-uniform over 1e-4..10, gamma log-uniform over 0.1..10, running_mean and beta
N(0, 0.1), each conv's channels scaled to the variance its BatchNorm recorded. The reference network for cross-layer equalization (``bnrewrite equalize``)."""

from __future__ import annotations

import torch
from torch import nn

_WIDTHS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
_WIDTHS += [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(self, classes: int = 100, width: float = 1.0) -> None:
        super().__init__()
        w = lambda c: max(8, int(c * width))  # noqa: E731
        layers = [_conv_bn(3, w(32), 3, 2)]
        for cin, cout, stride in _WIDTHS:
            layers += [_conv_bn(w(cin), w(cin), 3, stride, groups=w(cin)), _conv_bn(w(cin), w(cout), 1, 1)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w(1024), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def realistic_statistics(
    model: nn.Module, seed: int = 0, shape: tuple[int, ...] = (64, 3, 64, 64)
) -> nn.Module:
    """Seeded statistics as above, each conv's channels calibrated on random inputs of ``shape``
    to the variance its BatchNorm recorded; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)

    def log_uniform(n: int, lo: float, hi: float) -> torch.Tensor:
        return torch.exp(
            torch.empty(n).uniform_(float(torch.tensor(lo).log()), float(torch.tensor(hi).log()), generator=g)
        )

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0, (2.0 / m.weight[0].numel()) ** 0.5, generator=g)
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_var.copy_(log_uniform(c, 1e-4, 10))
                m.weight.copy_(log_uniform(c, 0.1, 10))
                m.running_mean.normal_(0, 0.1, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return _calibrated(model.eval(), g, shape)


def _pairs(model: nn.Module) -> dict[nn.Module, nn.BatchNorm2d]:
    """Each conv and the BatchNorm registered right after it with its channel count."""
    pairs: dict[nn.Module, nn.BatchNorm2d] = {}
    last = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            last = m
        elif isinstance(m, nn.BatchNorm2d) and last is not None and last.out_channels == m.num_features:
            pairs[last], last = m, None
    return pairs


def _calibrated(model: nn.Module, g: torch.Generator, shape: tuple[int, ...]) -> nn.Module:
    """Each conv's output channels scaled so their spread on data matches the BatchNorm's
    running_var (as training leaves them): the network stays finite however small a variance."""
    pairs = _pairs(model)

    def hook(conv: nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
        bn = pairs[conv]
        std = out.transpose(0, 1).reshape(out.shape[1], -1).std(dim=1)
        std = std.clamp_min(0.5 * float(std.median()) + 1e-12)  # (a nearly dead channel: not blown up)
        factor = bn.running_var.sqrt() / std
        conv.weight.mul_(factor.reshape(-1, 1, 1, 1))
        if conv.bias is not None:
            conv.bias.mul_(factor)
        return out * factor.reshape(1, -1, 1, 1)

    handles = [c.register_forward_hook(hook) for c in pairs]
    with torch.no_grad():
        model(torch.randn(*shape, generator=g))
    for h in handles:
        h.remove()
    return model


def build(width: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    return realistic_statistics(MobileNetV1(width=width))


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)),)
