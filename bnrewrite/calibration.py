"""Calibration batches for ``recalibrate``: from a file, or from code (any iterable of batches).

``--data pkg.mod:make_loader`` imports the module (from the current directory, like a factory
spec) and calls the factory; it may return any iterable of batches - a ``DataLoader``, a list,
a generator. A batch is a tensor, or a tuple/list of the model's positional inputs.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank must see its own shard, so that the all-reduced
sums equal one pass over all batches:
- a factory that accepts ``rank`` and ``world_size`` keyword arguments is called with them and
  shards itself (e.g. a ``DataLoader`` with ``DistributedSampler(dataset, world_size, rank,
  shuffle=False)``); each rank then uses all the batches it returns;
- any other factory (and a data file) is read by every rank, which keeps every
  ``world_size``-th batch starting at its ``rank`` (batch i goes to rank i mod world_size).

``max_batches`` limits the batches used in total over all ranks (the first N of the stream).
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import os
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from bnrewrite.errors import BnrewriteError, UsageError

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_factory_spec(data: str) -> bool:
    return bool(_SPEC.match(data)) and not Path(data).exists()


def calibration_batches(
    data: str,
    *,
    batch_size: int | None = None,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Any]:
    """This rank's calibration batches from a data file or a ``pkg.mod:factory`` spec."""
    if max_batches is not None and max_batches < 1:
        raise UsageError("--max-batches must be positive")
    if is_factory_spec(data):
        stream, sharded = _from_factory(data, rank, world_size)
    else:
        from bnrewrite.recalibrate import read_batches

        stream, sharded = iter(read_batches(data, batch_size)), False
    if sharded:  # the factory gave this rank its own shard: take its share of max_batches
        limit = None if max_batches is None else len(range(rank, max_batches, world_size))
        return _checked(itertools.islice(stream, limit), data)
    stream = itertools.islice(stream, max_batches)
    return _checked(itertools.islice(stream, rank, None, world_size), data)


def _from_factory(spec: str, rank: int, world_size: int) -> tuple[Iterator[Any], bool]:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise BnrewriteError(
            f"--data {spec}: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    factory: Any = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise BnrewriteError(f"--data {spec}: module {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise BnrewriteError(f"--data {spec}: is not callable")
    params = inspect.signature(factory).parameters
    shards_itself = "rank" in params and "world_size" in params
    try:
        loader = factory(rank=rank, world_size=world_size) if shards_itself else factory()
    except Exception as exc:
        raise BnrewriteError(f"--data {spec}: the factory raised {type(exc).__name__}: {exc}") from exc
    if isinstance(loader, (torch.Tensor, str, bytes)) or not isinstance(loader, Iterable):
        raise BnrewriteError(
            f"--data {spec}: returned a {type(loader).__name__}, not an iterable of batches (e.g. a DataLoader)"
        )
    return iter(loader), shards_itself


def _checked(batches: Iterator[Any], where: str) -> Iterator[Any]:
    for i, batch in enumerate(batches):
        items = batch if isinstance(batch, (tuple, list)) else (batch,)
        if not items or not all(isinstance(x, torch.Tensor) for x in items):
            kinds = ", ".join(type(x).__name__ for x in items) or "nothing"
            raise BnrewriteError(
                f"--data {where}: batch {i} holds {kinds}; a batch must be a tensor or a tuple of the "
                "model's input tensors"
            )
        yield batch
