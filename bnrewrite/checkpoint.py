"""Reading weights: state_dicts, checkpoint dicts (``state_dict``/``model``/... keys, a
DataParallel ``module.`` prefix), ``.safetensors``; always with ``weights_only=True``. The
structure a folded model's checkpoint records comes back with the weights."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnrewrite import structure
from bnrewrite.errors import BnrewriteError

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights", "params")


def _archive_kind(path: Path) -> str:
    """What a file is, from its bytes: pt2, torchscript, torch-zip, pickle, safetensors, ..."""
    size = path.stat().st_size
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(16)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            return "corrupt-zip"
        if any(n.endswith("archive_format") for n in names) and any("models/" in n for n in names):
            return "pt2"
        if any(n.endswith("serialized_exported_program.json") for n in names):
            return "pt2"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip"
        return "zip"
    if head[:1] == b"\x80":
        return "pickle"
    if size >= 8 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _require_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise BnrewriteError(f"{p}: no such file")
    if p.is_dir():
        raise BnrewriteError(f"{p}: is a directory, expected a model file")
    return p


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors``, a ``.pt``/``.pth`` state_dict or a checkpoint dict."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state_dict, the module structure bnrewrite recorded beside it, if any)."""
    p = _require_file(path)
    kind = _archive_kind(p)
    if kind == "safetensors" or p.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file
        except ImportError as exc:
            raise BnrewriteError(
                "reading .safetensors needs the safetensors package: pip install 'bnrewrite[safetensors]'"
            ) from exc
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            return dict(load_file(str(p))), structure.decode(meta.get(structure.KEY))
        except BnrewriteError:
            raise
        except Exception as exc:
            raise BnrewriteError(f"{p}: not a readable .safetensors file: {_short(exc)}") from exc
    if kind == "empty":
        raise BnrewriteError(f"{p}: file is empty")
    if kind not in ("torch-zip", "pickle"):
        raise BnrewriteError(f"{p}: not a weights file (expected .pt/.pth state_dict or .safetensors)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BnrewriteError(
            f"{p}: contains pickled Python objects besides tensors; refusing to unpickle it. Save "
            "weights with torch.save(model.state_dict(), ...) or as .safetensors"
        ) from exc
    except Exception as exc:
        raise BnrewriteError(f"{p}: cannot be read: {_short(exc)}") from exc
    layout = structure.decode(obj.get(structure.KEY)) if isinstance(obj, Mapping) else None
    return _extract_state_dict(obj, p), layout


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if _is_state_dict(obj):
        sd = dict(obj)
    elif isinstance(obj, Mapping) and any(_is_state_dict(obj.get(k)) for k in CHECKPOINT_KEYS):
        key = next(k for k in CHECKPOINT_KEYS if _is_state_dict(obj.get(k)))
        sd = dict(obj[key])
    else:
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else type(obj).__name__
        raise BnrewriteError(
            f"{path}: no state_dict found (looked for tensors at the top level and under "
            f"{', '.join(CHECKPOINT_KEYS)}; found: {keys})"
        )
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel/DDP
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a state_dict into ``model``, failing with the exact missing/unexpected/mismatched keys."""
    sd, layout = read_checkpoint(path)
    if layout is not None:  # written by bnrewrite: give the model the folded structure first
        structure.apply(model, layout, sd)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if items:
            more = f" (+{len(items) - 6} more)" if len(items) > 6 else ""
            problems.append(f"{label}: {', '.join(items[:6])}{more}")
    if problems:
        raise BnrewriteError(f"{path}: does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(sd, strict=True)


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
