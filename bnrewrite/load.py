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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnrewrite.checkpoint import _archive_kind, _require_file, _short, load_weights
from bnrewrite.errors import BnrewriteError, UsageError

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_UNREGISTERED = re.compile(r"Deserializing (\S+) in pytree is not registered")


@dataclass
class Loaded:
    """A loaded model, the example inputs that came with it, and what it was loaded from."""

    model: Any
    example_inputs: tuple[Any, ...] | None
    source: str
    kind: str  # "pt2" | "factory" | "pickle" | "object"


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
