import torch
from torch import nn

from bnrewrite.precision import Float64Everywhere


class MakesItsOwnFloat32(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.plain = torch.full((3,), 0.5)  # a plain attribute: .double() does not convert it

    def forward(self, x):
        prior = torch.ones(x.shape, dtype=torch.float32)
        h = torch.mm(self.fc(x) * prior, torch.eye(3, dtype=torch.float32))
        return (h.float() + self.plain) * torch.tensor([1.0, 2.0, 3.0]), torch.arange(3)


def test_factories_casts_and_plain_attributes_compute_in_float64():
    model = MakesItsOwnFloat32().double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with torch.no_grad(), Float64Everywhere():
        out, idx = model(x)
    assert out.dtype == torch.float64 and idx.dtype == torch.int64
    w, b = model.fc.weight, model.fc.bias
    expected = (x @ w.T + b + 0.5) * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.allclose(out, expected, rtol=0, atol=1e-14)


def test_default_dtype_is_restored():
    before = torch.get_default_dtype()
    with Float64Everywhere():
        assert torch.ones(1).dtype == torch.float64
    assert torch.get_default_dtype() == before and torch.ones(1).dtype == before
