"""Rewrite rules: each file is one kind of fold, declaring what it matches, its check (failing
with a code and a reason), its rewrite as plan steps (units of module-tree edits) and the local
check that proves it. Rules are listed here explicitly; nothing registers itself on import.

- :mod:`.norm_affine` (FD112, opt-in): a LayerNorm/RMSNorm/GroupNorm/InstanceNorm affine into
  the Linear / conv layers that read it.
"""
