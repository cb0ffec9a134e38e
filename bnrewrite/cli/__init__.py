"""The ``bnrewrite`` command line: parse, call the API, render the report.

Every failure is one line on stderr with exit code 2 (usage) or 1 (failure); ``--debug`` shows
the traceback instead.
"""

from bnrewrite.cli import analyze, fold, surgery  # noqa: F401  (each registers its commands on the app)
from bnrewrite.cli.base import app, main

__all__ = ["app", "main"]
