"""Rewrite rules: each file is one kind of fold, declaring what it matches, its check (failing
with a code and a reason), its rewrite as plan steps (units of module-tree edits) and the local
check that proves it. Rules are listed here explicitly; nothing registers itself on import.

BatchNorm (and per-channel affine site) folds, in the order :mod:`.bn_rules` tries them:

- :mod:`.into_preceding` (FD101, FD107): into the layer before, or a Linear through reshapes;
- :mod:`.into_concat` (FD105): into every layer of a channel concatenation before it;
- :mod:`.into_sum` (FD106): into every term of a sum before it;
- :mod:`.into_following` (FD102, FD107): into every layer after it.

:mod:`.fold_bn` runs them over a region to a fixed point (it owns the graph and the weight
slots), :mod:`.bn_tree` turns what they did into module-tree edits, and :mod:`.norm_rest` keeps
what a norm module's forward does beyond normalizing. Branch merges: :mod:`.branch_sets` (which
parallel branches are linear once folded) and :mod:`.merge_branches` (one conv for them, FD109).

- :mod:`.norm_affine` (FD112, opt-in): a LayerNorm/RMSNorm/GroupNorm/InstanceNorm affine into
  the Linear / conv layers that read it.
"""
