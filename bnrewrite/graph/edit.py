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
    """Copy-on-write editing of the modules under ``root`` (root itself must already be ours)."""

    def __init__(self, root: nn.Module, *, inplace: bool = False) -> None:
        self.root = root
        self.inplace = inplace
        self._owned: set[int] = {id(root)}

    def own(self, path: str) -> nn.Module:
        """The module at ``path``, copied (with its parents) unless already ours."""
        module = self.root
        if not path:
            return module
        for part in path.split("."):
            child = module._modules[part]
            assert child is not None
            if id(child) not in self._owned and not self.inplace:
                child = shallow_copy(child)
                module._modules[part] = child
                self._owned.add(id(child))
            module = child
        return module

    def set_module(self, path: str, new: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        owner = self.own(parent)
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
