"""Tiny models that trigger (or avoid) each rule."""

from __future__ import annotations

import torch
from torch import nn

from tests.conftest import randomize_bn


def conv_bn(bias: bool = False, train: bool = False) -> nn.Module:
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=bias), nn.BatchNorm2d(4))
    randomize_bn(m)
    return m.train(train)


def x4() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 8, 8),)


def codes_at(report, code: str) -> list[str | None]:
    return [d.node for d in report.diagnostics if d.code == code]
