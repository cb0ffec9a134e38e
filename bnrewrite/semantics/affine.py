"""The one value type for a per-channel affine map, ``y = x * scale + shift`` along ``axis``
(a BatchNorm in eval mode, a frozen BN, an ``Affine`` or layer-scale layer, a norm's
elementwise affine), and what a layer absorbed: the map applied before its input or after its
output. Rules produce these; the proof's local checks read them."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class Side(str, Enum):
    """Where a folded layer applies an absorbed map: to its input (a BatchNorm before it) or to
    its output (a BatchNorm after it)."""

    BEFORE = "pre"
    AFTER = "post"


@dataclass(frozen=True)
class Affine:
    """``x * scale + shift`` per channel along ``axis`` (1, or -1 for the last dim of tokens);
    ``shift`` None: no shift (a sum term whose shift another term takes)."""

    scale: torch.Tensor
    shift: torch.Tensor | None
    axis: int = 1


@dataclass(frozen=True)
class Absorbed:
    """A map a layer absorbed: it now computes ``layer(map(x))`` (BEFORE) or ``map(layer(x))``
    (AFTER)."""

    side: Side
    affine: Affine

    @property
    def before(self) -> bool:
        return self.side is Side.BEFORE
