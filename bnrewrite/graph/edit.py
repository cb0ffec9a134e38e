"""Copy-on-write edits of a module tree: the input model is never mutated.

A rewrite replaces a layer or a tensor at a dotted path. The editor shallow-copies every module
on that path the first time it touches it (sharing all other children and tensors), so only
what a rewrite changes is new and the original model keeps computing what it did.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with its own parameter/buffer/child dicts, sharing their values."""
    if isinstance(module, fx.GraphModule):
        return copy.copy(module)
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    return new


class Editor:
    """Copy-on-write editing of the modules under ``root`` (root itself must already be ours).

    A module registered at several paths (a parent that also keeps its blocks in a skip-layer
    chain, as MONAI's DynUNet does) is one object: it is copied once and the copy replaces it
    under every parent, so an edit made through one path is seen through all of them."""

    def __init__(self, root: nn.Module, *, inplace: bool = False) -> None:
        self.root = root
        self.inplace = inplace
        self._owned: set[int] = {id(root)}
        self._copies: dict[int, nn.Module] = {}  # id(original) -> our copy
        self._originals: dict[int, int] = {}  # id(our copy) -> id(original)
        self._holders: dict[int, list[tuple[nn.Module, str]]] | None = None

    def _index(self) -> dict[int, list[tuple[nn.Module, str]]]:
        """id(module) -> every (parent, name) that holds it, over the tree as it was given."""
        if self._holders is None:
            holders: dict[int, list[tuple[nn.Module, str]]] = {}
            seen: set[int] = set()
            stack = [self.root]
            while stack:
                m = stack.pop()
                if id(m) in seen:
                    continue
                seen.add(id(m))
                for name, child in m._modules.items():
                    if child is not None:
                        holders.setdefault(id(child), []).append((m, name))
                        stack.append(child)
            self._holders = holders
        return self._holders

    def _own_object(self, module: nn.Module) -> nn.Module:
        """Our copy of ``module``, put in place of it under every parent that holds it."""
        if self.inplace or id(module) in self._owned:
            return module
        if id(module) in self._copies:
            return self._copies[id(module)]
        new = shallow_copy(module)
        self._copies[id(module)] = new
        self._originals[id(new)] = id(module)
        self._owned.add(id(new))
        for parent, name in self._index().get(id(module), []):
            owner = self._own_object(parent)
            if owner._modules.get(name) is module:
                owner._modules[name] = new
        return new

    def own(self, path: str) -> nn.Module:
        """The module at ``path``, copied (with its parents) unless already ours."""
        module = self.root
        if not path:
            return module
        for part in path.split("."):
            child = module._modules[part]
            assert child is not None
            module = self._own_object(child)
        return module

    def holders(self, path: str) -> list[tuple[nn.Module, str]]:
        """Every (parent we own, name) holding the module at ``path``: where replacing it must
        happen so that no other path keeps the old module."""
        parent, _, name = path.rpartition(".")
        owner = self.own(parent)
        places = [(owner, name)]
        old = owner._modules.get(name)
        if old is None:  # a new name
            return places
        for p, n in self._index().get(self._originals.get(id(old), id(old)), []):
            o = self._own_object(p)
            if o._modules.get(n) is old and not any(o is q and n == m for q, m in places):
                places.append((o, n))
        return places

    def set_module(self, path: str, new: nn.Module) -> None:
        for owner, name in self.holders(path):
            owner._modules[name] = new
        self._owned.add(id(new))

    def set_tensor(self, path: str, value: torch.Tensor, *, parameter: bool | None = None) -> None:
        """Put ``value`` at ``path`` as a parameter or buffer (keeping what was there before)."""
        parent, _, name = path.rpartition(".")
        owner = self.own(parent)
        old = getattr(owner, name, None)
        as_param = isinstance(old, nn.Parameter) if parameter is None else parameter
        if name in owner._parameters or (as_param and name not in owner._buffers):
            requires_grad = old.requires_grad if isinstance(old, nn.Parameter) else True
            owner._parameters[name] = nn.Parameter(value, requires_grad=requires_grad)
        elif name in owner._buffers:
            owner._buffers[name] = value
        else:
            owner.register_buffer(name, value)

    def free_name(self, base: str) -> str:
        """A top-level attribute name not used yet, derived from ``base``."""
        base = base.replace(".", "_")
        name, k = base, 1
        while hasattr(self.root, name):
            k += 1
            name = f"{base}_{k}"
        return name


def get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split(".") if path else []:
        obj = getattr(obj, part)
    return obj
