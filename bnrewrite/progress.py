"""Progress bars for long runs (calibration batches, outputs compared, models analyzed).

Shown on stderr by the command line only when stderr is a terminal and the output is not
machine-readable (``--json``/``--format``); the Python API never draws them unless asked
(``progress.enable(True)``). ``BNREWRITE_PROGRESS=1`` forces them on, ``=0`` off.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
_state = {"enabled": False}


def enable(on: bool) -> None:
    _state["enabled"] = on


def wanted(quiet: bool) -> bool:
    """Whether a command should show progress: not ``quiet``, and stderr is a terminal."""
    forced = os.environ.get("BNREWRITE_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1" and not quiet
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def task(description: str, total: int | None = None) -> Iterator[Any]:
    """A progress task; ``advance()`` on what it yields (a no-op when progress is off)."""
    if not _state["enabled"]:
        yield _Silent()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    console = Console(stderr=True)
    # On a terminal the bar disappears when done; forced on elsewhere, its final state stays.
    with Progress(*columns, console=console, transient=console.is_terminal) as bar:
        task_id = bar.add_task(description, total=total)
        yield _Live(bar, task_id)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a progress bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with task(description, total) as t:
        for item in items:
            yield item
            t.advance()


class _Silent:
    def advance(self, n: int = 1) -> None:
        pass


class _Live:
    def __init__(self, bar: Any, task_id: Any) -> None:
        self.bar, self.task_id = bar, task_id

    def advance(self, n: int = 1) -> None:
        self.bar.advance(self.task_id, n)
