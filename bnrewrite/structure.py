"""The module-tree structure a rewrite changed, saved beside a state_dict and re-applied on load.

A folded model's state_dict has no BatchNorm tensors and may have biases the original class does
not create. Loading it into a freshly built model (``bnrewrite.load(factory, weights=...)``)
only works strictly if that model gets the same structure first, so a state_dict written by
bnrewrite records it: which modules are ``nn.Identity`` (absorbed BatchNorms), which are
``ChannelAffine`` (BatchNorms kept as scale-and-shift), which norm modules that did more than
normalize became the chain of their own children (``rests``), which conv/linear layers have a bias,
which of torch's LayerNorm/RMSNorm/GroupNorm/InstanceNorm modules have no affine (``no_affine``:
its affine folded into the layers after it, FD112), and which modules were replaced by graphs (those cannot be rebuilt from the user's code).
Stored under the ``bnrewrite_structure`` key of a ``.pt`` checkpoint, or as safetensors metadata.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.conv import _ConvNd

from bnrewrite.editor.edit import Editor
from bnrewrite.errors import BnrewriteError
from bnrewrite.modules import ChannelAffine
from bnrewrite.rewrite_rules.norm_rest import REST_ATTR, chain_of

KEY = "bnrewrite_structure"
VERSION = 1


def describe(model: nn.Module) -> dict[str, Any]:
    """The structure of ``model`` that a factory-built model must be given before loading."""
    identity, affine, bias, graphs, no_affine = [], [], [], [], []
    rests: dict[str, list[str]] = {}
    if isinstance(model, fx.GraphModule):
        graphs.append("")
    for path, m in model.named_modules():
        if not path:
            continue
        if type(m) is nn.Identity:
            identity.append(path)
        elif isinstance(m, ChannelAffine):
            affine.append(path)
        elif isinstance(getattr(m, REST_ATTR, None), list):
            rests[path] = list(getattr(m, REST_ATTR))
        elif isinstance(m, (_ConvNd, nn.Linear)) and m.bias is not None:
            bias.append(path)
        elif _affine_off(m):
            no_affine.append(path)
        elif isinstance(m, fx.GraphModule) and not any(path.startswith(g + ".") for g in graphs if g):
            graphs.append(path)
    out = {"version": VERSION, "identity": identity, "affine": affine, "bias": bias, "graphs": graphs}
    if rests:  # norm modules that do more: replaced by the chain of their own children
        out["rests"] = rests
    if no_affine:
        out["no_affine"] = no_affine
    return out


_AFFINE_FLAGS = ("elementwise_affine", "affine")
_PER_SAMPLE = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    getattr(nn, "RMSNorm", nn.LayerNorm),
)


def _affine_off(m: nn.Module) -> bool:
    """A torch per-sample norm whose affine flag is off (and so has no weight)."""
    return isinstance(m, _PER_SAMPLE) and any(getattr(m, f, None) is False for f in _AFFINE_FLAGS)


def encode(structure: dict[str, Any]) -> str:
    return json.dumps(structure, sort_keys=True)


def decode(text: Any) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        data = json.loads(text) if isinstance(text, str) else dict(text)
    except (ValueError, TypeError) as exc:
        raise BnrewriteError(f"unreadable {KEY} entry: {exc}") from exc
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise BnrewriteError(
            f"{KEY} has an unknown version: {data.get('version') if isinstance(data, dict) else data}"
        )
    return data


def apply(model: nn.Module, structure: dict[str, Any], state: dict[str, torch.Tensor]) -> list[str]:
    """Give ``model`` the recorded structure (in place) so ``state`` loads strictly into it.
    Returns what was changed, one line per module."""
    if structure.get("graphs"):
        where = ", ".join(p or "<root>" for p in structure["graphs"])
        raise BnrewriteError(
            f"these weights come from a model where {where} was replaced by a graph (FD104); your "
            "factory cannot rebuild that part: load the .pt2 or .py written from the same result"
        )
    changes = []
    for path, names in structure.get("rests", {}).items():
        module = _get(model, path)
        try:
            _set(model, path, chain_of(module, names))
        except AttributeError as exc:
            raise BnrewriteError(f"{KEY} chains {names} of {path}, which this model does not have") from exc
        changes.append(f"{path}: Sequential({', '.join(names)})")
    for path in structure.get("identity", []):
        if type(_get(model, path)) is not nn.Identity:
            _set(model, path, nn.Identity())
            changes.append(f"{path}: Identity")
    for path in structure.get("affine", []):
        scale = state.get(f"{path}.scale")
        if scale is None:
            raise BnrewriteError(f"{KEY} names {path} as ChannelAffine, but the weights have no {path}.scale")
        _set(model, path, ChannelAffine(torch.empty_like(scale), torch.empty_like(scale)))
        changes.append(f"{path}: ChannelAffine")
    for path in structure.get("no_affine", []):
        norm = _get(model, path)
        if getattr(norm, "weight", None) is not None:
            for name in ("weight", "bias"):
                if name in norm._parameters:
                    norm._parameters[name] = None
            for flag in _AFFINE_FLAGS:
                if isinstance(getattr(norm, flag, None), bool):
                    setattr(norm, flag, False)
            changes.append(f"{path}: affine off")
    for path in structure.get("bias", []):
        layer = _get(model, path)
        if isinstance(layer, (_ConvNd, nn.Linear)) and layer.bias is None:
            n = (
                layer.weight.shape[1] * layer.groups
                if getattr(layer, "transposed", False)
                else layer.weight.shape[0]
            )
            layer.bias = nn.Parameter(torch.zeros(n, dtype=layer.weight.dtype, device=layer.weight.device))
            changes.append(f"{path}: bias added")
    return changes


def _get(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise BnrewriteError(f"{KEY} names {path}, which this model does not have: wrong factory?") from exc


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the module at ``path`` under every parent that holds it (a module registered at
    several paths is one object)."""
    _get(model, path)
    Editor(model, inplace=True).set_module(path, new)
