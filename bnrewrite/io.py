"""Load models safely: ``.pt2`` programs, ``package.module:factory`` specs plus weights, and
(only on explicit request) pickled modules.

Nothing here executes code from a file unless the user passed ``trust_pickle=True``: state_dicts
and checkpoints are read with ``weights_only=True``, pickled modules and TorchScript archives are
recognized from the archive layout and refused with what to provide instead.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import pickle
import re
import sys
import traceback
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import structure
from .errors import BnrewriteError, UsageError

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights", "params")


@dataclass
class Loaded:
    """A loaded model, the example inputs that came with it, and what it was loaded from."""

    model: Any
    example_inputs: tuple[Any, ...] | None
    source: str
    kind: str  # "pt2" | "factory" | "pickle" | "object"


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


def load(
    spec: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
    imports: Iterable[str] = (),
    auto_import: bool = True,
) -> Loaded:
    """Load a model from a ``.pt2`` file, a ``package.module:factory`` spec or a pickled module.

    A ``.pt2`` whose inputs/outputs use a pytree-registered type (a ``ModelOutput``-style
    dataclass) needs the module that registers it imported first: ``imports`` are imported up
    front, and with ``auto_import`` the module named by the type's serialized name is imported
    when it is importable (like a factory spec's module); otherwise the error names the type
    and the import that fixes it."""
    text = str(spec)
    if _SPEC.match(text) and not Path(text).exists():
        return load_factory(text, weights=weights)
    path = _require_file(text)
    kind = _archive_kind(path)
    if weights is not None:
        raise UsageError("--weights goes with a package.module:factory spec, not with a model file")
    if kind == "pt2":
        ep = load_program(path, imports=imports, auto_import=auto_import)
        inputs = None
        if ep.example_inputs is not None:
            args, kwargs = ep.example_inputs
            inputs = tuple(args) if not kwargs else None
        return Loaded(ep, inputs, str(path), "pt2")
    if kind == "torchscript":
        raise BnrewriteError(
            f"{path}: is a TorchScript archive, which torch.fx cannot trace; provide the model code "
            "(package.module:factory with --weights) or a torch.export .pt2 file instead"
        )
    if kind == "empty":
        raise BnrewriteError(f"{path}: file is empty")
    if kind == "safetensors":
        raise BnrewriteError(
            f"{path}: holds only weights; give the model as package.module:factory --weights {path}"
        )
    if kind in ("torch-zip", "pickle"):
        return _load_pickled(path, trust_pickle)
    raise BnrewriteError(
        f"{path}: not a model file bnrewrite can read (expected a .pt2 program, a "
        "package.module:factory spec, or a pickled module with --trust-pickle)"
    )


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


_UNREGISTERED = re.compile(r"Deserializing (\S+) in pytree is not registered")


def load_program(
    path: Path, *, imports: Iterable[str] = (), auto_import: bool = True
) -> torch.export.ExportedProgram:
    """``torch.export.load`` with the pytree types its signature needs registered first."""
    for name in imports:
        _import(name, f"--import {name}")
    tried: set[str] = set()
    while True:
        try:
            with _torch_export_log() as log:
                return torch.export.load(path)
        except Exception as exc:
            found = _UNREGISTERED.search(str(exc)) or _UNREGISTERED.search(log.text() + _real_error(path))
            if found is None:
                raise BnrewriteError(f"{path}: not a readable .pt2 program: {_short(exc)}") from exc
            type_name = found.group(1)
            module = _defining_module(type_name)
            if auto_import and module is not None and module not in tried:
                tried.add(module)
                _import(module, f"{path} names {type_name}")
                continue
            fix = (
                f"import {module} first (CLI: --import {module})"
                if module
                else "import the module that registers it"
            )
            off = "; automatic import is off (--no-import)" if not auto_import and module else ""
            raise BnrewriteError(
                f"{path}: the program's inputs/outputs use {type_name}, which torch's pytree must know "
                f"before loading: {fix}{off}"
            ) from exc


class _Captured(logging.Handler):
    """Keeps what torch.export logs while loading (it logs the real deserialization error and
    raises a generic one), instead of printing it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def text(self) -> str:
        parts = []
        for r in self.records:
            parts.append(r.getMessage())
            if r.exc_info:
                parts.append("".join(traceback.format_exception(*r.exc_info)))
        return "\n".join(parts)


@contextlib.contextmanager
def _torch_export_log() -> Iterator[_Captured]:
    logger = logging.getLogger("torch.export")
    handler = _Captured()
    saved, logger.handlers = logger.handlers, [handler]  # torch's own handler prints to stderr
    propagate, logger.propagate = logger.propagate, False
    disabled, logger.disabled = logger.disabled, False
    try:
        yield handler
    finally:
        logger.handlers = saved
        logger.propagate = propagate
        logger.disabled = disabled


def _real_error(path: Path) -> str:
    """The error behind torch.export.load's generic one (it retries an old format and reports
    that failure instead), from its archive reader; '' when that is unavailable."""
    try:
        from torch.export.pt2_archive._package import load_pt2
    except ImportError:  # pragma: no cover - other torch versions
        return ""
    try:
        load_pt2(str(path))
    except Exception as exc:
        return "".join(traceback.format_exception(exc))
    return ""


def _defining_module(type_name: str) -> str | None:
    """The longest importable module prefix of a serialized type name (``pkg.mod.Class``)."""
    parts = type_name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:k])
        try:
            if importlib.util.find_spec(name) is not None:
                return name
        except (ImportError, ValueError):
            continue
    return None


def _import(name: str, why: str) -> None:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as for factory specs: the user's own modules
    try:
        importlib.import_module(name)
    except Exception as exc:
        raise BnrewriteError(f"{why}: importing {name} failed: {_short(exc)}") from exc


def _load_pickled(path: Path, trust_pickle: bool) -> Loaded:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise BnrewriteError(
                f"{path}: is a pickled Python object (e.g. torch.save(model)); unpickling it can run "
                "arbitrary code, so it is refused. Pass --trust-pickle if you trust its origin, or "
                "provide a .pt2 file or package.module:factory with --weights"
            ) from exc
    except Exception as exc:
        raise BnrewriteError(f"{path}: cannot be read: {_short(exc)}") from exc
    else:
        if isinstance(obj, Mapping):
            raise BnrewriteError(
                f"{path}: holds a state_dict or checkpoint, not a model; give the model code as "
                f"package.module:factory --weights {path}"
            )
        if not isinstance(obj, nn.Module):
            raise BnrewriteError(f"{path}: holds a {type(obj).__name__}, not a model")
        return Loaded(obj, None, str(path), "pickle")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise BnrewriteError(f"{path}: cannot be unpickled: {_short(exc)}") from exc
    if not isinstance(obj, nn.Module):
        raise BnrewriteError(f"{path}: holds a {type(obj).__name__}, not an nn.Module")
    return Loaded(obj, None, str(path), "pickle")


def _resolve(spec: str) -> tuple[Any, Any]:
    module_name, _, attr = spec.partition(":")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise BnrewriteError(f"{spec}: cannot import module {module_name!r}: {_short(exc)}") from exc
    except Exception as exc:
        raise BnrewriteError(f"{spec}: importing {module_name!r} failed: {_short(exc)}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BnrewriteError(f"{spec}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return module, obj


def load_factory(spec: str, *, weights: str | os.PathLike[str] | None = None) -> Loaded:
    """Call ``package.module:factory`` to build the model, then load ``weights`` into it."""
    if not _SPEC.match(spec):
        raise UsageError(f"{spec!r}: expected package.module:factory")
    module, factory = _resolve(spec)
    if not callable(factory):
        raise BnrewriteError(f"{spec}: is not callable")
    try:
        model = factory()
    except Exception as exc:
        raise BnrewriteError(f"{spec}: the factory raised {_short(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise BnrewriteError(f"{spec}: returned a {type(model).__name__}, not an nn.Module")
    if weights is not None:
        load_weights(model, weights)
    inputs = None
    make_inputs = getattr(module, "example_inputs", None)
    if callable(make_inputs):
        try:
            inputs = make_inputs()
        except Exception as exc:
            raise BnrewriteError(f"{spec}: example_inputs() raised {_short(exc)}") from exc
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return Loaded(model, inputs, spec, "factory")


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


def parse_shapes(shapes: list[str] | None) -> list[tuple[int, ...]]:
    """``["1,3,224,224", ...]`` -> list of shapes; a clear usage error for anything else."""
    out = []
    for text in shapes or []:
        try:
            dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
        except ValueError as exc:
            raise UsageError(
                f"--input-shape {text!r}: expected comma-separated integers like 1,3,224,224"
            ) from exc
        if not dims or any(d <= 0 for d in dims):
            raise UsageError(f"--input-shape {text!r}: dimensions must be positive integers")
        out.append(dims)
    return out


def model_dtype(model: Any) -> torch.dtype:
    m = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    for p in list(m.parameters()) + list(m.buffers()):
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def inputs_for(loaded: Loaded, shapes: list[str] | None, seed: int = 0) -> tuple[Any, ...] | None:
    """Example inputs: from --input-shape (random, seeded) or those that came with the model."""
    dims = parse_shapes(shapes)
    if dims:
        g = torch.Generator().manual_seed(seed)
        dtype = model_dtype(loaded.model)
        return tuple(torch.randn(d, generator=g).to(dtype) for d in dims)
    return loaded.example_inputs
