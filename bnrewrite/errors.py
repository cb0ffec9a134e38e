"""Errors the user can act on.

Every failure that reaches the CLI is one of these, so it can be printed as a single line with a
stable exit code instead of a traceback.
"""

from __future__ import annotations


class BnrewriteError(Exception):
    """A failure caused by the input or the environment, not by a bug in bnrewrite (exit 1)."""

    exit_code = 1


class UsageError(BnrewriteError):
    """The command line or API call itself is wrong (exit 2)."""

    exit_code = 2


class VerificationError(BnrewriteError):
    """A rewrite did not reproduce the original model's outputs within tolerance."""
