"""bnrewrite: analyze, fold and rewrite normalization layers of PyTorch models."""

from bnrewrite.analyze import analyze
from bnrewrite.diagnostics import Diagnostic, Report, Severity
from bnrewrite.equalize import equalize
from bnrewrite.errors import BnrewriteError, UsageError, VerificationError
from bnrewrite.export import export
from bnrewrite.fold import RewriteResult, fold
from bnrewrite.load import load
from bnrewrite.recalibrate import recalibrate
from bnrewrite.surgery import fix, insert, remove, swap
from bnrewrite.verify import VerifyResult, verify
from bnrewrite.weight_precision import PrecisionThresholds

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
