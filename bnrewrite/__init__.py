"""bnrewrite: analyze, fold and rewrite normalization layers of PyTorch models."""

from .analyze import analyze
from .diagnostics import Diagnostic, Report, Severity
from .equalize import equalize
from .errors import BnrewriteError, UsageError, VerificationError
from .export import export
from .fold import RewriteResult, fold
from .load import load
from .recalibrate import recalibrate
from .surgery import fix, insert, remove, swap
from .verify import VerifyResult, verify
from .weight_precision import PrecisionThresholds

__version__ = "0.1.0"

__all__ = [
    "BnrewriteError",
    "Diagnostic",
    "PrecisionThresholds",
    "Report",
    "RewriteResult",
    "Severity",
    "UsageError",
    "VerificationError",
    "VerifyResult",
    "analyze",
    "equalize",
    "export",
    "fix",
    "fold",
    "insert",
    "load",
    "recalibrate",
    "remove",
    "swap",
    "verify",
]
