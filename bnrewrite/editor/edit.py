"""Copy-on-write edits of a module tree: the input model is never mutated.

A rewrite replaces a layer or a tensor at a dotted path. The editor shallow-copies every module
on that path the first time it touches it (sharing all other children and tensors), so only
what a rewrite changes is new and the original model keeps computing what it did.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

_TORCH_SLOTS = frozenset(nn.Module().__dict__)  # torch's own attributes of every module
_HOOK_SLOTS = tuple(n for n in _TORCH_SLOTS if "hooks" in n and isinstance(nn.Module().__dict__[n], dict))
_CONTAINERS = (list, tuple, dict)


def _holds_module(value: Any, depth: int = 3) -> bool:
    if isinstance(value, nn.Module):
        return True
    if depth == 0:
        return False
    if isinstance(value, (list, tuple)):
        return any(_holds_module(v, depth - 1) for v in value)
    if isinstance(value, dict):
        return any(_holds_module(v, depth - 1) for v in value.values())
    return False


def _copy_container(value: Any) -> Any:
    """A copy of the lists/tuples/dicts that hold modules (the modules themselves shared)."""
    if isinstance(value, list):
        return [_copy_container(v) for v in value]
    if isinstance(value, tuple) and _holds_module(value, 2):
        items = [_copy_container(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict) and _holds_module(value, 2):
        new = copy.copy(value)
        for k, v in value.items():
            new[k] = _copy_container(v)
        return new
    return value


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object with its own parameter/buffer/child dicts, hook dicts and the plain
    containers that hold modules (a block list kept beside the registered children), sharing
    every value in them."""
    if isinstance(module, fx.GraphModule):
        new = copy.copy(module)
    else:
        new = copy.copy(module)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        new._modules = dict(module._modules)
    for name in _HOOK_SLOTS:
        if name in module.__dict__:
            new.__dict__[name] = type(module.__dict__[name])()  # hooks stay with their object
    if _plain_torch(module):
        return new
    for name, value in module.__dict__.items():
        if type(value) in _CONTAINERS and name not in _TORCH_SLOTS and _holds_module(value):
            new.__dict__[name] = _copy_container(value)
    return new


def _plain_torch(module: nn.Module) -> bool:
    """torch's own layers keep their children only as registered children."""
    return type(module).__module__.startswith("torch.nn.")


# Where a module is held: ("module", parent, name) a registered child; ("attr", parent, name) a
# plain attribute; ("item", parent, name, keys) inside a plain list/tuple/dict attribute.
Holder = tuple[Any, ...]


def _contained(
    value: Any, keys: tuple[Any, ...], depth: int = 3
) -> Iterator[tuple[nn.Module, tuple[Any, ...]]]:
    if isinstance(value, nn.Module):
        yield value, keys
    elif depth > 0 and isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _contained(v, (*keys, i), depth - 1)
    elif depth > 0 and isinstance(value, dict):
        for k, v in value.items():
            yield from _contained(v, (*keys, k), depth - 1)


def _replaced(container: Any, keys: tuple[Any, ...], new: Any) -> Any:
    """``container`` with the item at ``keys`` set to ``new`` (lists and dicts in place)."""
    if not keys:
        return new
    k, rest = keys[0], keys[1:]
    child = _replaced(container[k], rest, new)
    if isinstance(container, tuple):
        items = list(container)
        items[k] = child
        return type(container)(*items) if hasattr(container, "_fields") else type(container)(items)
    container[k] = child
    return container


def held(holder: Holder) -> Any:
    """What ``holder`` holds now."""
    kind, parent, name = holder[:3]
    if kind == "module":
        return parent._modules.get(name)
    value = parent.__dict__.get(name)
    for k in holder[3] if kind == "item" else ():
        value = value[k]
    return value


def put(holder: Holder, new: Any) -> None:
    """Make ``holder`` hold ``new``."""
    kind, parent, name = holder[:3]
    if kind == "module":
        parent._modules[name] = new
    elif kind == "attr":
        parent.__dict__[name] = new
    else:
        parent.__dict__[name] = _replaced(parent.__dict__[name], holder[3], new)


class Editor:
    """Copy-on-write editing of the modules under ``root`` (root itself must already be ours).

    A module held at several places is one object: it is copied once and the copy replaces it
    wherever the tree holds it - under every parent that registered it (MONAI's DynUNet keeps
    its blocks in a skip-layer chain too), and in plain lists, tuples, dicts and attributes of
    those parents (a block list kept beside the registered children) - so an edit made through
    one path is seen through every way ``forward`` can reach the module."""

    def __init__(self, root: nn.Module, *, inplace: bool = False) -> None:
        self.root = root
        self.inplace = inplace
        self._owned: set[int] = {id(root)}
        self._copies: dict[int, nn.Module] = {}  # id(original) -> our copy
        self._originals: dict[int, nn.Module] = {}  # id(our copy) -> the original
        self._holders: dict[int, list[Holder]] | None = None

    def _index(self) -> dict[int, list[Holder]]:
        """id(module) -> every place that holds it, over the tree as it was given."""
        if self._holders is None:
            holders: dict[int, list[Holder]] = {}
            seen: set[int] = set()
            stack = [self.root]
            while stack:
                m = stack.pop()
                if id(m) in seen:
                    continue
                seen.add(id(m))
                for name, child in m._modules.items():
                    if child is not None:
                        holders.setdefault(id(child), []).append(("module", m, name))
                        stack.append(child)
                for name, value in () if _plain_torch(m) else m.__dict__.items():
                    if not isinstance(value, (*_CONTAINERS, nn.Module)) or name in _TORCH_SLOTS:
                        continue
                    if not _holds_module(value):
                        continue
                    for child, keys in _contained(value, ()):
                        where = ("item", m, name, keys) if keys else ("attr", m, name)
                        holders.setdefault(id(child), []).append(where)
            self._holders = holders
        return self._holders

    def original_of(self, module: nn.Module) -> nn.Module:
        """The user's module that ``module`` (ours) is a copy of; itself when not a copy."""
        return self._originals.get(id(module), module)

    def _own_object(self, module: nn.Module) -> nn.Module:
        """Our copy of ``module``, put in place of it wherever the tree holds it."""
        if self.inplace or id(module) in self._owned:
            return module
        if id(module) in self._copies:
            return self._copies[id(module)]
        new = shallow_copy(module)
        self._copies[id(module)] = new
        self._originals[id(new)] = module
        self._owned.add(id(new))
        for holder in self._index().get(id(module), []):
            mine = (holder[0], self._own_object(holder[1]), *holder[2:])
            if held(mine) is module:
                put(mine, new)
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

    def holders(self, path: str) -> list[Holder]:
        """Every place (in modules we own) holding the module at ``path``: where replacing it
        must happen so that no other path, list or attribute keeps the old module."""
        parent, _, name = path.rpartition(".")
        owner = self.own(parent)
        places: list[Holder] = [("module", owner, name)]
        old = owner._modules.get(name)
        if old is None:  # a new name
            return places
        original = self._originals.get(id(old), old)
        for holder in self._index().get(id(original), []):
            mine = (holder[0], self._own_object(holder[1]), *holder[2:])
            if held(mine) is old and not any(
                p[0] == mine[0] and p[1] is mine[1] and p[2:] == mine[2:] for p in places
            ):
                places.append(mine)
        return places

    def set_module(self, path: str, new: nn.Module) -> None:
        for holder in self.holders(path):
            put(holder, new)
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
