"""bnrewrite: analyze, fold and rewrite normalization layers of PyTorch models."""

from .analyze import analyze
from .diagnostics import Diagnostic, Report, Severity
from .errors import BnrewriteError, UsageError, VerificationError
from .fold import RewriteResult, fold

__version__ = "0.1.0"

__all__ = [
    "BnrewriteError",
    "Diagnostic",
    "Report",
    "RewriteResult",
    "Severity",
    "UsageError",
    "VerificationError",
    "analyze",
    "fold",
]
