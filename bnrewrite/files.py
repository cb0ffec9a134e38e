"""Output files: formats by extension, early checks, and atomic writes.

Every write is atomic: the file is written beside the target under a temporary name and renamed
into place only when complete, so a failure never leaves a partial output. An existing output is
only replaced with ``force=True``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bnrewrite.errors import BnrewriteError, UsageError

MODEL_FORMATS = ("pt2", "onnx", "py")
WEIGHT_FORMATS = ("pt", "safetensors")
GRAPH_FORMATS = ("json", "graphml", "dot", "svg")
FORMATS = MODEL_FORMATS + WEIGHT_FORMATS + GRAPH_FORMATS


def format_of(path: str | os.PathLike[str], fmt: str | None = None) -> str:
    """The output format: explicit, else from the file extension."""
    if fmt:
        fmt = fmt.lower().lstrip(".")
    else:
        fmt = Path(path).suffix.lower().lstrip(".")
        fmt = {"gml": "graphml", "pth": "pt"}.get(fmt, fmt)
    if fmt not in FORMATS:
        raise UsageError(
            f"{path}: cannot tell the output format from {fmt!r}; use one of "
            f"{', '.join('.' + f for f in FORMATS)} or --format"
        )
    return fmt


def check_output(path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Fail early, before any work, when the output cannot or must not be written."""
    p = Path(path)
    if p.exists() and p.is_dir():
        raise BnrewriteError(f"{p}: is a directory")
    if p.exists() and not force:
        raise BnrewriteError(f"{p}: already exists; pass --force to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise BnrewriteError(f"{p}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BnrewriteError(f"{p}: directory {parent} is not writable")
    return p


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only on success."""
    target = check_output(path, force=force)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.stem}.tmp.", suffix=target.suffix, dir=target.parent or "."
        )
    except OSError as exc:
        raise BnrewriteError(f"{target}: cannot write here: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        try:
            os.chmod(tmp_path, 0o666 & ~umask)
            os.replace(tmp_path, target)
        except OSError as exc:
            raise BnrewriteError(f"{target}: cannot write: {exc.strerror or exc}") from exc
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
