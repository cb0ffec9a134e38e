"""Where a folded layer's weight and bias live, and how they are written: a module's
parameters or two graph attributes, in place (``inplace=True``), detached (the new tensors wait
for the module-tree edits) or as new parameters."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bnrewrite.editor.edit import Editor
from bnrewrite.semantics.norms import fetch_attr
from bnrewrite.stash import Stash

Compute = Callable[[torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, "torch.Tensor | None"]]


class Slot:
    """Where a layer's weight and bias live: a module's parameters, or two graph attributes."""

    def __init__(
        self,
        owner: nn.Module,
        weight_attr: str | None,
        bias_attr: str | None,
        *,
        in_place: bool,
        editor: Editor | None = None,
    ) -> None:
        self.owner = owner
        self.names = (weight_attr, bias_attr)
        self.in_place = in_place
        self.editor = editor
        self.detached = False  # True: new tensors are kept here, the owner is never written
        self.values: list[torch.Tensor | None] = [None, None]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's (weight, bias) as they are now (after ``fill``: the folded ones)."""
        weight = self._get(0)
        assert weight is not None
        return weight, self._get(1)

    def _get(self, i: int) -> torch.Tensor | None:
        if self.values[i] is not None:
            return self.values[i]
        attr = self.names[i]
        if attr is None:
            return self.owner._parameters.get(("weight", "bias")[i])
        return fetch_attr(self.owner, attr)

    def stash_into(self, stash: Stash) -> None:
        """Save the tensors an in-place fill will overwrite (their values may be needed back)."""
        if not self.in_place:
            return
        for i in (0, 1):
            t = self._get(i)
            if t is not None:
                stash.keep(t)

    def fill(self, compute: Compute) -> None:
        weight, bias = self._get(0), self._get(1)
        assert weight is not None
        w, b = compute(weight, bias)
        self._set(
            0, weight, w.to(dtype=weight.dtype, device=weight.device), requires_grad=weight.requires_grad
        )
        if b is not None:  # None: the layer keeps having no bias (a sum term without the shift)
            b = b.to(dtype=(bias if bias is not None else weight).dtype, device=weight.device)
            self._set(1, bias, b, requires_grad=weight.requires_grad)

    def _set(self, i: int, old: torch.Tensor | None, new: torch.Tensor, *, requires_grad: bool) -> None:
        if self.in_place and old is not None and old.shape == new.shape and old.dtype == new.dtype:
            with torch.no_grad():
                old.copy_(new)  # inplace=True: reuse the existing storage
            return
        if self.detached:
            self.values[i] = new
            return
        attr = self.names[i]
        if attr is None:
            name = ("weight", "bias")[i]
            grad = old.requires_grad if isinstance(old, nn.Parameter) else requires_grad
            self.owner._parameters[name] = nn.Parameter(new, requires_grad=grad)
        else:
            assert self.editor is not None
            self.editor.set_tensor(attr, new)
