"""The catalogue of stable diagnostic codes; `bnrewrite explain CODE` prints these texts.

The texts live in ``bnrewrite.catalogue`` (lint, fold, precision); here they are looked up and
turned into diagnostics. Codes are never renumbered or reused.
"""

from __future__ import annotations

from bnrewrite.catalogue import fold, lint, precision
from bnrewrite.diagnostics import Code, Diagnostic
from bnrewrite.errors import UsageError

_ALL = [*lint.CODES, *fold.CODES, *precision.CODES]


CODES: dict[str, Code] = {c.id: c for c in _ALL}


def all_codes() -> list[Code]:
    """Every code, in catalogue order."""
    return list(_ALL)


def get(code: str) -> Code:
    """Look up a code, case-insensitively; unknown codes are a usage error."""
    key = code.strip().upper()
    if key not in CODES:
        raise UsageError(f"unknown code {code!r}; known codes: {', '.join(sorted(CODES))}")
    return CODES[key]


def finding(
    code: str,
    message: str,
    node: str | None = None,
    module_path: str | None = None,
    source: str | None = None,
) -> Diagnostic:
    """A diagnostic with the catalogued severity of ``code``."""
    return Diagnostic(code, get(code).severity, message, node, module_path, source)
