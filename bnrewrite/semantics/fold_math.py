"""The arithmetic of folding an eval-mode BatchNorm into a neighbouring layer.

BatchNorm in eval mode is a per-channel affine map ``y = x * s + t`` with
``s = gamma / sqrt(running_var + eps)`` and ``t = beta - running_mean * s``
(gamma = 1, beta = 0 when ``affine=False``).

Into the preceding layer z = W x + b (BN acts on z's output channels o):
    W'[o] = W[o] * s[o],    b'[o] = b[o] * s[o] + t[o]
Conv weights are [out, in/groups, *k]; ConvTranspose weights are [in, out/groups, *k], so there
output channel o = g * (out/groups) + j lives at column j of the rows of group g.

Into the following layer z = W y + b with y = x * s + t (BN acts on input channels i):
    W'[.., i, ..] = W[.., i, ..] * s[i],    b'[o] = b[o] + sum_{i, taps} W[o, i, taps] * t[i]
which is exact only if every output position sees every tap of real data (no zero padding).

Everything is computed in float64 and cast back to the layer's dtype and device; weights of the
preceding layer are multiplied in float64 and stored straight into the layer's dtype (one pass).
"""

from __future__ import annotations

import torch


def _bias64(bias: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return torch.zeros(n, dtype=torch.float64, device=like.device)
    return bias.detach().to(torch.float64)


def _prepare(
    weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Detached weight, scale/shift on its device, and the trailing 1s for kernel dims."""
    w = weight.detach()
    return w, scale.to(device=w.device), shift.to(device=w.device), (1,) * (w.dim() - 2)


def into_preceding(
    kind: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Folded (weight, bias) of a conv/conv_transpose/linear followed by ``x * scale + shift``.

    The weight comes back in the layer's dtype (computed in float64), the bias in float64;
    ``shift=None`` (a sum term whose shift another term takes) leaves a missing bias missing.
    """
    w, s, t, extra = _prepare(weight, scale, shift if shift is not None else scale)
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
    if kind == "conv_transpose":
        cin, cout_g = w.shape[0], w.shape[1]
        shape = (groups, cin // groups, cout_g, *w.shape[2:])
        torch.mul(w.reshape(shape), s.reshape(groups, 1, cout_g, *extra), out=out.view(shape))
        n_out = cout_g * groups
    else:
        torch.mul(w, s.reshape(-1, 1, *extra), out=out)
        n_out = w.shape[0]
    if shift is None:
        return out, None if bias is None else bias.detach().to(torch.float64) * s
    return out, _bias64(bias, n_out, w) * s + t


def into_following(
    kind: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded (weight, bias) of ``x * scale + shift`` followed by a conv/conv_transpose/linear."""
    w, s, t, extra = _prepare(weight.to(torch.float64), scale, shift)
    if kind == "linear":
        return w * s.reshape(1, -1), _bias64(bias, w.shape[0], w) + w @ t
    if kind == "conv_transpose":
        # Only 1x1, stride-1 transposed convs are folded; then it is a grouped pointwise map.
        cin, cout_g = w.shape[0], w.shape[1]
        w_new = w * s.reshape(-1, 1, *extra)
        wg = w.reshape(groups, cin // groups, cout_g, -1).sum(-1)  # [g, in/g, out/g]
        shift_out = (wg * t.reshape(groups, cin // groups, 1)).sum(1).reshape(-1)
        return w_new, _bias64(bias, cout_g * groups, w) + shift_out
    cout, cin_g = w.shape[0], w.shape[1]
    wg = w.reshape(groups, cout // groups, cin_g, *w.shape[2:])
    sg = s.reshape(groups, 1, cin_g, *extra)
    tg = t.reshape(groups, 1, cin_g, *extra)
    w_new = (wg * sg).reshape(w.shape)
    shift_out = (wg * tg).reshape(groups, cout // groups, -1).sum(-1).reshape(-1)
    return w_new, _bias64(bias, cout, w) + shift_out
