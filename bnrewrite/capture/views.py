"""Container views in module paths map back to the user's modules.

``self.model[:-1]``, ``self.blocks[1:]``, ``self.layers[::2]`` build a new ``nn.Sequential`` or
``nn.ModuleList`` of the same module objects. A tracer that follows attribute access records the
view in its module paths: ``model.slice(None, -1, None).0.bn``. A Sequential's slice keeps the
original keys; a ModuleList's slice numbers its items from 0. Such a path is mapped to the path
of the same module object in the user's tree (``model.0.bn``), so a fold lands in that tree.

Guarantees: a path that names no view, or one that cannot be resolved against the tree, comes
back unchanged (the plan then says it cannot map it, as before).
"""

from __future__ import annotations

import re

from torch import fx, nn

_SLICE = re.compile(r"^slice\((-?\d+|None), (-?\d+|None), (-?\d+|None)\)$")


def _bound(text: str) -> int | None:
    return None if text == "None" else int(text)


def user_path(path: str, root: nn.Module) -> str:
    """``path`` with every container view (``slice(a, b, c)`` and the index into it) replaced by
    the key of the same module in ``root``'s tree."""
    if "slice(" not in path:
        return path
    segments = iter(path.split("."))
    out: list[str] = []
    cur: nn.Module | None = root
    for seg in segments:
        view = _SLICE.match(seg)
        if view is None:
            out.append(seg)
            cur = cur._modules.get(seg) if cur is not None else None
            continue
        if cur is None:
            return path
        keys = list(cur._modules)[slice(*(_bound(g) for g in view.groups()))]
        item = next(segments, None)
        if item is None:  # the view itself was called: its modules live in its container
            return ".".join(out)
        if isinstance(cur, nn.Sequential) and item in keys:
            key = item  # a Sequential's slice keeps the original keys
        elif item.isdigit() and int(item) < len(keys):
            key = keys[int(item)]
        else:
            return path
        out.append(key)
        cur = cur._modules.get(key)
    return ".".join(out)


def map_views(gm: fx.GraphModule, root: nn.Module) -> None:
    """Rewrite every ``nn_module_stack`` entry of ``gm`` (exported from ``root``) that names a
    container view to the user's module path."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack or not any("slice(" in str(v[0]) for v in stack.values()):
            continue
        node.meta["nn_module_stack"] = {
            k: (_mapped(v[0], root), *v[1:]) if "slice(" in str(v[0]) else v for k, v in stack.items()
        }


def _mapped(entry: object, root: nn.Module) -> str:
    text = str(entry)
    suffix = re.search(r"@\d+$", text)  # torch.export marks repeated calls as ``path@1``
    base = text[: suffix.start()] if suffix else text
    return user_path(base, root) + (suffix.group(0) if suffix else "")
