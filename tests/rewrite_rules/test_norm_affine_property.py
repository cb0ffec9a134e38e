"""Property: over random norm -> layers blocks the norm-affine fold applies and stays exact.

Random: LayerNorm (bias on/off), torch's RMSNorm, an RMSNorm written op by op, GroupNorm
(groups), InstanceNorm (affine); 1-3 readers; Linear bias on/off; convs with groups, kernel,
stride and dilation but no padding; float32 / float64. The folded model against float64 must
stay within a few times the original model's own error.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bnrewrite import fold
from samples.transformer_blocks import RMSNorm
from tests.conftest import float64_reference


class Block(nn.Module):
    def __init__(self, norm: nn.Module, readers: list[nn.Module]) -> None:
        super().__init__()
        self.norm, self.readers = norm, nn.ModuleList(readers)

    def forward(self, x):
        h = self.norm(x)
        return [r(h) for r in self.readers]


@st.composite
def blocks(draw):
    kind = draw(st.sampled_from(["layer", "rms", "rms_ops", "group", "instance"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    n = draw(st.integers(1, 3))
    biases = [draw(st.booleans()) for _ in range(n)]
    if kind in ("layer", "rms", "rms_ops"):
        d = draw(st.integers(2, 12))
        norm = {
            "layer": lambda: nn.LayerNorm(d, bias=draw(st.booleans())),
            "rms": lambda: nn.RMSNorm(d),
            "rms_ops": lambda: RMSNorm(d),
        }[kind]()
        readers = [nn.Linear(d, draw(st.integers(1, 6)), bias=b) for b in biases]
        shape = (2, draw(st.integers(1, 4)), d)
    else:
        groups = draw(st.sampled_from([1, 2]))
        c = groups * draw(st.integers(1, 3))
        norm = nn.GroupNorm(groups, c) if kind == "group" else nn.InstanceNorm2d(c, affine=True)
        readers = []
        for b in biases:
            g = draw(st.sampled_from([1, groups]))
            k, stride, dil = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
            readers.append(nn.Conv2d(c, g * draw(st.integers(1, 3)), k, stride, 0, dil, groups=g, bias=b))
        shape = (2, c, 7, 7)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    with torch.no_grad():
        for name, p in norm.named_parameters():
            p.copy_(
                torch.rand(p.shape, generator=gen) * (2 if name == "weight" else 1)
                - (0 if name == "weight" else 0.5)
            )
    model = Block(norm, readers).eval().to(dtype)
    return model, torch.randn(*shape, generator=gen).to(dtype)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks())
def test_norm_affine_fold_is_exact(case):
    model, x = case
    want = float64_reference(model, x)
    folded, report = fold(model, (x,), norm_affine=True)
    assert [a.code for a in report.actions] == ["FD112"], [d.message for d in report.diagnostics]
    with torch.no_grad():
        own, got = model(x), folded(x)
    slack = 1e-12 if x.dtype == torch.float64 else 1e-6
    for w, o, g in zip(want, own, got):
        assert (g.double() - w).abs().max() <= 4 * (o.double() - w).abs().max() + slack * (1 + w.abs().max())
