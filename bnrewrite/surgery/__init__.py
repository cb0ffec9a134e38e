"""Norm surgery: swap, insert, remove and fix norm layers, each reporting whether the function
is preserved.

Module norms are replaced copy-on-write in the user's own module tree, so the result keeps the
model's class (and stays trainable as before); functional/ATen BatchNorms and insertions are
rewritten in the traced graph, and only the regions that needed it become GraphModules. An
exact rewrite is verified numerically on the example inputs; a function-changing one reports the
measured output deviation.

Each operation collects its edits first (module replacements by path, graph edits by scope) and
applies them with the one editor (:class:`~bnrewrite.editor.edit.Editor`) in a last step:
``dry_run=True`` (CLI ``--dry-run``) stops before it and returns the model untouched with the
edits as ``report.extra['plan']``, as ``fold`` does.
"""

from bnrewrite.surgery.fix import FIXABLE, fix
from bnrewrite.surgery.insert import identity_batchnorm, insert
from bnrewrite.surgery.remove import remove
from bnrewrite.surgery.swap import swap

__all__ = ["FIXABLE", "fix", "identity_batchnorm", "insert", "remove", "swap"]
