"""One definition of "reads a value": shape, dtype and device reads (and asserts built from them)
are not readers, in both dialects; every op that may read values is."""

from __future__ import annotations

import torch
from torch import fx, nn

from bnrewrite.semantics.readers import metadata_readers, move_metadata_readers, value_readers


class Reads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        torch._assert(y.ndim == 4, "4D")
        b, c, h, w = y.shape
        n = y.size(1) + y.dim() + y.numel()
        z = torch.zeros_like(y)
        same = x.new_ones(1).expand_as(y)
        torch._assert(y.is_contiguous(), "contiguous")
        return y.relu() * n + same + z.reshape(b, c, h, w)  # relu: the one value reader


def _conv_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.target == "conv" or "conv2d" in str(n.target))


def test_shape_reads_are_not_value_readers_in_fx():
    gm = fx.symbolic_trace(Reads())
    conv = _conv_node(gm)
    readers = value_readers(conv)
    assert [n.target for n in readers] == ["relu"], readers
    assert len(metadata_readers(conv)) >= 8  # ndim, shape, size, dim, numel, zeros_like, ...


def test_shape_reads_are_not_value_readers_in_export():
    x = torch.randn(2, 3, 8, 8)
    gm = torch.export.export(Reads(), (x,), dynamic_shapes=({0: torch.export.Dim("b")},)).module()
    conv = _conv_node(gm)
    kinds = {str(u.target) for u in value_readers(conv)}
    assert kinds == {"aten.relu.default"}, kinds
    assert {str(u.target) for u in metadata_readers(conv)} == {
        "aten.zeros_like.default",
        "aten.expand_as.default",  # reads the shape of its second argument only
    }
    x_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert any("sym_size" in str(u.target) for u in metadata_readers(x_node))


def test_an_op_that_reads_values_is_a_reader():
    """The definition must be able to say yes: an add, a reshape and a getattr of a non-metadata
    attribute all read the values."""

    class M(nn.Module):
        def forward(self, x):
            return x.reshape(-1) + x.T.sum() + x.real.sum()

    gm = fx.symbolic_trace(M())
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert len(value_readers(x)) == 3 and not metadata_readers(x)


def test_moving_shape_reads_lets_the_value_go():
    gm = fx.symbolic_trace(Reads())
    conv = _conv_node(gm)
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(conv):
        other = gm.graph.call_function(torch.neg, (conv,))
    move_metadata_readers(conv, other)
    assert not metadata_readers(conv) and len(metadata_readers(other)) >= 8
    assert x in conv.all_input_nodes  # the conv itself is untouched
    gm.graph.lint()
    gm.recompile()
    gm(torch.randn(1, 3, 5, 5))  # the moved reads still run after what they read
