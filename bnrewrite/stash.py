"""Old weights on disk, for a fold that writes into the model's own tensors (``inplace=True``)
and may still have to undo some of them.

Keeping every original weight in RAM until the proof has run would double the model's memory,
which is what ``inplace=True`` is for avoiding. A :class:`Stash` writes each tensor a fold is
about to overwrite to a file of its own in a private temporary folder; a local check or an
undo reads it back only for as long as it needs it. The folder is removed when the stash is
closed (or garbage-collected).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass

import torch


class Stash:
    """Tensors saved by key to a private temporary folder, read back on demand."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="bnrewrite-stash-")
        self._keys: dict[int, str] = {}
        self._closer = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def keep(self, tensor: torch.Tensor) -> None:
        """Save ``tensor`` as it is now (once; later calls for the same tensor do nothing)."""
        if id(tensor) in self._keys:
            return
        path = os.path.join(self.folder, f"{len(self._keys)}.pt")
        torch.save(tensor.detach(), path)
        self._keys[id(tensor)] = path

    def has(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self._keys

    def saved(self, tensor: torch.Tensor) -> Saved:
        return Saved(self._keys[id(tensor)], tensor)

    def close(self) -> None:
        self._closer()


@dataclass(frozen=True)
class Saved:
    """The old value of ``tensor``, on disk."""

    path: str
    tensor: torch.Tensor

    def load(self) -> torch.Tensor:
        return torch.load(self.path, map_location=self.tensor.device, weights_only=True)

    def restore(self) -> None:
        with torch.no_grad():
            self.tensor.copy_(self.load())
