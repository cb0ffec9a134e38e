"""Which layers a command acts on: dotted-path globs and module type names.

``--select 'layer1.*'`` matches dotted module paths with shell-style globs; ``--type
BatchNorm2d`` matches the layer's kind (module class name, or ``F.batch_norm``/``aten.batch_norm``
for functional calls). Several globs or types are alternatives; a path glob and a type must both
match. No selector selects everything.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Selector:
    paths: tuple[str, ...] = field(default_factory=tuple)
    types: tuple[str, ...] = field(default_factory=tuple)
    prefix: str = ""  # set for a submodule: its paths are matched as ``prefix.path``

    @classmethod
    def of(
        cls,
        select: Selector | str | Iterable[str] | None = None,
        types: Iterable[str | type] | None = None,
    ) -> Selector:
        if isinstance(select, Selector):
            return select
        paths = (select,) if isinstance(select, str) else tuple(select or ())
        names = tuple(t if isinstance(t, str) else t.__name__ for t in (types or ()))
        return cls(tuple(p for p in paths if p), tuple(n.lower() for n in names))

    def under(self, prefix: str) -> Selector:
        """The same selection, for the submodule at ``prefix`` (paths relative to it)."""
        full = f"{self.prefix}.{prefix}" if self.prefix and prefix else (prefix or self.prefix)
        return Selector(self.paths, self.types, full)

    def matches(self, module_path: str | None, kind: str) -> bool:
        path = module_path or ""
        if self.prefix:
            path = f"{self.prefix}.{path}" if path else self.prefix
        if self.paths and not any(fnmatch.fnmatchcase(path, p) for p in self.paths):
            return False
        return not self.types or kind.lower() in self.types

    def describe(self) -> str:
        parts = [f"path {' or '.join(self.paths)}" for _ in [0] if self.paths]
        parts += [f"type {' or '.join(self.types)}" for _ in [0] if self.types]
        return " and ".join(parts) or "all"
