"""An exported block that replaces one of the user's modules accepts any shape again when
nothing in its graph depends on the example's shapes, and keeps the guards otherwise."""

import importlib

import pytest
import torch
from torch import nn

from bnrewrite import fold
from bnrewrite.capture.unguard import drop_export_guards
from bnrewrite.verify import verify


def test_merged_exported_blocks_take_other_batch_and_spatial_sizes():
    mod = importlib.import_module("samples.dbb")  # captured by torch.export (in-place border writes)
    model, inputs = mod.build(), mod.example_inputs()
    folded, _ = fold(model, inputs)
    for shape in ((1, 3, 32, 32), (3, 3, 40, 24)):
        x = (torch.randn(shape),)
        assert verify(model, folded, x).passed


class _Baked(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).view(x.shape[0], -1)


class _Free(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)) + x


def test_guards_stay_where_a_size_is_baked_into_the_graph():
    gm = torch.export.export(_Baked(), (torch.randn(2, 3, 4),)).module()
    assert not drop_export_guards(gm)
    with pytest.raises(Exception, match=r"Guard failed|shape"):
        gm(torch.randn(3, 3, 4))


def test_guards_go_where_every_op_takes_any_shape():
    model = _Free().eval()
    gm = torch.export.export(model, (torch.randn(2, 2, 5, 5),)).module()
    assert drop_export_guards(gm)
    x = torch.randn(1, 2, 7, 3)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x))
