"""Lint codes (BN0xx): BatchNorm pitfalls the lint rules (``bnrewrite.lint``) find."""

from __future__ import annotations

from bnrewrite.diagnostics import Code, Severity

_W, _E, _I = Severity.WARNING, Severity.ERROR, Severity.INFO

CODES = [
    Code(
        "BN001",
        "redundant-bias",
        _W,
        "conv/linear bias directly before BatchNorm is redundant",
        "What: a Conv or Linear with a bias feeds a BatchNorm directly.\n"
        "Why: BatchNorm subtracts the (batch or running) mean per channel, which removes any\n"
        "constant per-channel offset, so the bias is learned for nothing and costs memory.\n"
        "Fix (safe): `bnrewrite.fix(model, codes=['BN001'])` drops the bias and absorbs it\n"
        "into the BatchNorm's running mean, exact in eval mode and in training mode.",
    ),
    Code(
        "BN002",
        "training-mode",
        _W,
        "BatchNorm is in training mode",
        "What: the BatchNorm layer has `training=True`.\n"
        "Why: in training mode its output depends on the statistics of the current batch, not on\n"
        "the running statistics, so the layer cannot be folded and inference results vary with\n"
        "batch composition. Most often `model.eval()` was forgotten before export.\n"
        "Fix: call `model.eval()`, or pass `--eval` to `bnrewrite fold` to fold the eval-mode\n"
        "behaviour.",
    ),
    Code(
        "BN003",
        "stats-never-updated",
        _W,
        "running statistics were never updated (mean 0, var 1, num_batches_tracked 0)",
        "What: the BatchNorm's running mean is all zeros, running var all ones and\n"
        "num_batches_tracked is 0: the values it was initialized with.\n"
        "Why: the model was never trained in training mode, or its statistics were not loaded\n"
        "from the checkpoint. In eval mode the layer then only applies its affine transform.\n"
        "Fix: load the right state_dict, or re-estimate the statistics with\n"
        "`bnrewrite recalibrate`.",
    ),
    Code(
        "BN004",
        "bad-statistics",
        _E,
        "non-finite or non-positive running_var, or non-finite running_mean / affine",
        "What: running_var has values <= 0, NaN or Inf, or running_mean, weight or bias has NaN\n"
        "or Inf.\n"
        "Why: the layer produces NaN/Inf or huge outputs in eval mode; folding would write\n"
        "those into the neighbouring weights. Usually a diverged training run or a bad cast.\n"
        "Fix: re-estimate the statistics (`bnrewrite recalibrate`) or fix the checkpoint.",
    ),
    Code(
        "BN005",
        "no-running-stats",
        _W,
        "BatchNorm has track_running_stats=False",
        "What: the BatchNorm keeps no running statistics.\n"
        "Why: it always normalizes with the statistics of the current batch, also at inference,\n"
        "so outputs depend on what else is in the batch and the layer cannot be folded.\n"
        "Fix: if per-sample normalization is intended, use GroupNorm/InstanceNorm\n"
        "(`bnrewrite swap --to gn`); otherwise enable running stats and recalibrate.",
    ),
    Code(
        "BN006",
        "dropout-before-bn",
        _W,
        "dropout directly before BatchNorm",
        "What: a Dropout layer feeds a BatchNorm directly.\n"
        "Why: dropout changes the variance of its output between training and inference, so the\n"
        "running variance BatchNorm learned in training does not match what it sees at\n"
        "inference (the 'variance shift', Li et al. 2019).\n"
        "Fix: move dropout after the last BatchNorm, or drop it.",
    ),
    Code(
        "BN007",
        "norm-after-norm",
        _W,
        "a normalization layer directly after another",
        "What: a norm layer's only input is another norm layer's output.\n"
        "Why: the second normalization mostly undoes the first; this is usually a leftover from\n"
        "refactoring. Both are still folded where possible.\n"
        "Fix: remove one (`bnrewrite remove --select PATH`).",
    ),
    Code(
        "BN008",
        "tiny-batch",
        _W,
        "batch size 1 with BatchNorm in training mode",
        "What: the example input has batch size 1 and a BatchNorm is in training mode.\n"
        "Why: batch statistics over one sample are noisy or undefined (PyTorch raises for 1\n"
        "value per channel). Small-batch training works better with GroupNorm.\n"
        "Fix: `bnrewrite swap --to gn`, or train with larger batches.",
    ),
    Code(
        "BN009",
        "producer-shared",
        _I,
        "the layer before BatchNorm has other users",
        "What: the conv/linear output that feeds this BatchNorm is also used elsewhere.\n"
        "Why: folding BatchNorm into that conv would change what the other users see, so a\n"
        "plain fold into the preceding layer is impossible. bnrewrite then tries the following\n"
        "layer, else replaces the BatchNorm by its per-channel scale and shift.",
    ),
    Code(
        "BN010",
        "shared-conv",
        _I,
        "one conv/linear module is called at several places",
        "What: the same module object is called at more than one place in forward().\n"
        "Why: a naive fold rewrites the shared weights and corrupts the other call sites.\n"
        "bnrewrite folds per call site, giving a folded copy only to the sites that need one.",
    ),
]
