"""The catalogue of stable diagnostic codes; `bnrewrite explain CODE` prints these texts.

BN0xx are lint findings (rules/), FD1xx say what a fold does with a BatchNorm, FD2xx say why a
BatchNorm cannot be folded into a neighbour, PR0xx what a fold does to low-precision deployment. Codes are never renumbered or reused.
"""

from __future__ import annotations

from .diagnostics import Code, Diagnostic, Severity
from .errors import UsageError

_W, _E, _I = Severity.WARNING, Severity.ERROR, Severity.INFO

_ALL = [
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
    Code(
        "FD101",
        "fold-into-preceding",
        _I,
        "BatchNorm folds into the preceding conv/linear",
        "The BatchNorm's eval-mode scale s = weight / sqrt(running_var + eps) multiplies the\n"
        "preceding layer's output channels and its shift becomes the bias:\n"
        "W' = W * s, b' = (b - running_mean) * s + bias. Exact in eval mode.",
    ),
    Code(
        "FD102",
        "fold-into-following",
        _I,
        "BatchNorm folds into the following conv/linear",
        "The BatchNorm feeds a conv/linear directly (BN placed after the activation). Its\n"
        "scale multiplies that layer's input channels and its shift t is pushed through the\n"
        "weights into the bias: W' = W * s (per input channel), b' = b + sum(W * t).\n"
        "Exact only when every output position sees every kernel tap of real data: no zero\n"
        "padding (reflect/replicate/circular padding is fine).",
    ),
    Code(
        "FD103",
        "scale-shift",
        _I,
        "BatchNorm becomes a per-channel scale-and-shift",
        "No neighbouring conv/linear can absorb this BatchNorm, so it is replaced by its\n"
        "eval-mode per-channel affine map y = x * s + t (one multiply-add, no statistics).\n"
        "Exact in eval mode; reported as a replacement, not as a fold.",
    ),
    Code(
        "FD105",
        "fold-into-concat",
        _I,
        "folded into the layers of a channel concatenation",
        "What: the BatchNorm normalizes torch.cat([a(x), b(y), ...], dim=1) where every piece is a\n"
        "conv / conv-transpose / linear output read by nothing else (eval-mode Dropout and\n"
        "Identity are looked through). Each layer absorbs its own slice of the per-channel scale\n"
        "and shift, so the BatchNorm disappears (mixed-kernel, inception-style blocks).\n"
        "Exact in eval mode.",
    ),
    Code(
        "FD106",
        "fold-into-sum",
        _I,
        "folded into the terms of a sum",
        "What: the BatchNorm normalizes a(x) + b(y) (+ ...) of conv / linear outputs read by\n"
        "nothing else: the scale goes into every term, the shift into one term's bias\n"
        "(dual-path and shake-shake style blocks). Exact in eval mode.",
    ),
    Code(
        "FD107",
        "fold-through-reshape",
        _I,
        "folded into a Linear through reshapes",
        "What: Linear -> flatten/reshape/view/transpose/permute -> BatchNorm1d (token models:\n"
        "`bn(x.flatten(0, 1)).reshape_as(x)`, `bn(linear(x).transpose(1, 2))`), or BatchNorm ->\n"
        "reshapes -> Linear. Folded only when the recorded shapes prove that the BatchNorm's\n"
        "channel axis is the Linear's feature axis after those ops; otherwise FD202 says why.\n"
        "Exact in eval mode.",
    ),
    Code(
        "FD108",
        "fold-would-be-slower",
        _I,
        "kept as BatchNorm: the fold would make a transposed conv slower on this machine",
        "What: folding this BatchNorm would give a transposed convolution that has no bias a new\n"
        "one. On CPU, oneDNN adds a deconvolution bias on a slow path for 1x1 and grouped kernels\n"
        "(measured up to 2.5x the bias-free layer): more than the BatchNorm costs. Such a fold is\n"
        "timed on the layer's recorded input shape and kept only if the layer with the bias is no\n"
        "slower (within 3 %) than the layer plus the BatchNorm; the message gives both timings.\n"
        "Fix: nothing to fix here. When the model will run on another backend (GPU, TensorRT,\n"
        "ONNX Runtime), `fold --no-speed-check` (API: `speed_check=False`) folds it anyway.",
    ),
    Code(
        "FD109",
        "branches-merged",
        _I,
        "parallel linear branches were merged into one conv",
        "What: a sum of branches that read the same tensor - convs whose kernels nest (1x1 and\n"
        "3x1/1x3 inside 3x3), identities, BatchNorms, average pools, per-channel scales, 1x1 -> kxk\n"
        "chains, also subtracted or scaled by a stored per-channel factor - is one convolution of\n"
        "that tensor. RepVGG, ACNet, DBB, MobileOne, RepConv and RepMixer blocks train that way\n"
        "and are meant to run as one conv. `fold` computes it in float64 (no per-class code) and\n"
        "runs it in place of the branches; the block that sums them becomes its merged graph\n"
        "(FD104), since its forward reads every branch. A set merges only when the conv costs no\n"
        "more multiply-adds and stores no more values than the branches.\n"
        "Opt out: `fold --keep-branches` (API: `merge_branches=False`).",
    ),
    Code(
        "FD110",
        "branches-not-merged",
        _I,
        "branches that read the same tensor were not merged",
        "What: a sum has two or more branches reading one tensor, but they are not one conv, for\n"
        "the reason given: a nonlinear op between the tensor and the sum (a residual block), a\n"
        "stride or padding mismatch, kernels that do not nest, a 1x1 -> kxk chain whose shift\n"
        "would meet the kxk conv's zero padding (not exact at the border; DBB pads with the shift\n"
        "for that reason), average pooling that excludes padding, a BatchNorm in training mode,\n"
        "or a merged conv that would cost more than the branches.\n"
        "Fix: usually nothing; for a 1x1 -> kxk chain, pad with the BatchNorm's shift.",
    ),
    Code(
        "FD104",
        "module-replaced-by-graph",
        _I,
        "a module was replaced by its folded graph",
        "What: a fold that no edit of the module tree can express - a functional `F.batch_norm`\n"
        "or ATen batch_norm, a conv/linear shared between a folded and an unfolded call site, a\n"
        "module called several times - is carried by replacing the smallest module that encloses\n"
        "it with its own folded graph (a GraphModule). Everything outside stays your own modules.\n"
        "Why it matters: that module is no longer your class inside the result (its methods and\n"
        "attributes are gone); a state_dict cannot rebuild it from your code.\n"
        "Fix: use BatchNorm modules instead of functional calls, give each call site its own\n"
        "conv, or keep the result as .pt2/.py.",
    ),
    Code(
        "FD201",
        "zero-padding-after",
        _I,
        "following conv pads with zeros",
        "The BatchNorm feeds a conv that pads with zeros. Padded positions would not receive\n"
        "the BatchNorm's shift, so folding into that conv is not exact. Use reflect,\n"
        "replicate or circular padding, or padding=0, to make it foldable.",
    ),
    Code(
        "FD202",
        "channel-mismatch",
        _I,
        "BatchNorm channel dim is not the linear layer's feature dim",
        "BatchNorm normalizes dim 1; a Linear acts on the last dim. They coincide only for 2-D\n"
        "(N, C) tensors. For other ranks, or when the ranks are unknown because no example\n"
        "inputs were given, the fold is not done. Pass example inputs (--input-shape).",
    ),
    Code(
        "FD203",
        "opaque",
        _I,
        "BatchNorm sits in code that could not be traced",
        "The layer is called from a forward() that torch.fx could not trace (data-dependent\n"
        "control flow, non-torch calls), so its neighbours are unknown and it is left as is.\n"
        "Make that code traceable, or mark the untraceable part as a leaf module.",
    ),
    Code(
        "FD204",
        "non-constant-parameters",
        _I,
        "weights or statistics are computed in the graph",
        "A weight, bias or statistic of the BatchNorm or its neighbour is not a stored tensor\n"
        "but the result of a computation in forward(), so it cannot be rewritten statically.",
    ),
    Code(
        "FD205",
        "not-batchnorm",
        _I,
        "per-sample normalization cannot be folded",
        "GroupNorm, LayerNorm and InstanceNorm compute statistics from each input at inference,\n"
        "so they are not constant affine maps and cannot be folded into weights.",
    ),
    Code(
        "FD206",
        "no-neighbour",
        _I,
        "no neighbouring conv/linear can absorb the BatchNorm",
        "Neither the producer nor every consumer of this BatchNorm is a conv/linear that can\n"
        "absorb it exactly (e.g. BN -> ReLU -> conv in pre-activation blocks).",
    ),
]

_ALL += [
    Code(
        "FD207",
        "fold-undone",
        _W,
        "a fold was undone or not applied: it does not compute what it replaced",
        "What: the fold of this BatchNorm was not kept. Either the eager run contradicts the graph\n"
        "it was planned on (the layer's output has more consumers than the graph shows, or the\n"
        "BatchNorm does not read the layer's output): 'not applied'; or the proof found it wrong:\n"
        "its local check (the folded layer and the module at the BatchNorm's place, compared with\n"
        "the original modules on the inputs they received) failed, the original module object\n"
        "still runs in the result ('did not take effect': it is also held somewhere the module\n"
        "tree does not show), or the outputs drifted beyond float32 rounding and beyond twice the\n"
        "original's own error against float64 (then every fold is undone).\n"
        "Why: tracing silently took another branch, a module's forward does something the graph\n"
        "does not show, or the folded weights lose too much precision (extreme running_var,\n"
        "low-precision dtypes).\n"
        "Fix: check the layer's statistics (BN004) or the code around it; `--verify` shows the\n"
        "float64 comparison.",
    ),
    Code(
        "FD208",
        "not-an-affine-map",
        _I,
        "looks like a norm or an affine layer, but is not folded",
        "What: a module that looks like a frozen BatchNorm, an Affine or a layer-scale layer (by its\n"
        "class name or its running statistics) is not folded: evaluating its ops on probe inputs\n"
        "showed it is not a per-channel affine map of one input (it mixes channels or positions,\n"
        "is nonlinear, reads other activations), or it could not be evaluated alone (its input\n"
        "shape is unknown without example inputs). The message gives the exact reason.\n"
        "Fix: pass example inputs (--input-shape) where the shape was unknown; otherwise nothing\n"
        "to do: the module does more than a per-channel scale and shift.",
    ),
    Code(
        "SW001",
        "rewrite-refused",
        _W,
        "a selected layer could not be rewritten",
        "What: swap, insert, remove, fix or recalibrate selected this layer but could not apply\n"
        "the rewrite; the message gives the exact reason (e.g. GroupNorm groups that leave one value\n"
        "per group for this input shape, an unknown input rank, a shared conv).\n"
        "Fix: adjust --groups / --select, or pass example inputs (--input-shape) so shapes are known.",
    ),
    Code(
        "SW002",
        "changes-function",
        _I,
        "the rewrite changes what the model computes",
        "What: the rewrite is not exact in eval mode (e.g. BatchNorm -> GroupNorm uses per-sample\n"
        "statistics, removing a norm removes its normalization). The report gives the measured\n"
        "output deviation on the example inputs. Retrain, fine-tune or recalibrate afterwards.",
    ),
]

_ALL += [
    Code(
        "PR001",
        "fp16-overflow",
        _E,
        "a folded weight or bias leaves float16's range (|v| > 65504)",
        "What: folding multiplied a layer's weights by gamma / sqrt(running_var + eps), and some\n"
        "folded weight or bias values exceed 65504, the largest float16. Also reported for a\n"
        "BatchNorm whose own scale exceeds the target dtype: it cannot run there folded or not.\n"
        "Why: in float16 those values become Inf and the layer's output Inf/NaN.\n"
        "Fix: `fold --target-dtype fp16` keeps such BatchNorms unfolded (FD111); or recalibrate\n"
        "the statistics (tiny running_var is the usual cause), or run that layer in float32.",
    ),
    Code(
        "PR002",
        "int8-channel-spread",
        _W,
        "per-channel weight ranges spread so far that per-tensor int8 loses the small channels",
        "What: the largest output channel's weight range is many times the smallest one's\n"
        "(`channel_spread`), and symmetric per-tensor int8 quantization of the folded weights\n"
        "loses several dB of SQNR against per-channel quantization (both given in dB).\n"
        "Why: one int8 step sized for the largest channel rounds the small channels to a few\n"
        "levels or to zero (BN folding is a known cause: per-tensor int8 after folding takes\n"
        "MobileNetV2 to ~0.1% top-1).\n"
        "Fix: quantize per channel, or run `bnrewrite equalize` (cross-layer equalization).\n"
        "Threshold: [tool.bnrewrite.precision] int8-spread and sqnr-gap-db.",
    ),
    Code(
        "PR003",
        "subnormal-values",
        _W,
        "subnormal folded values in float32 or in the target dtype",
        "What: nonzero folded weight or bias values below the smallest normal number of float32\n"
        "(or of the target dtype: 6.1e-05 for float16).\n"
        "Why: subnormal arithmetic is slow on many CPUs (a model went from 13 ms to 70-88 ms) and\n"
        "loses precision; in float16 such values lose most of their digits.\n"
        "Fix: flush them to zero (`torch.set_flush_denormal(True)`) or recalibrate the statistics.",
    ),
    Code(
        "PR004",
        "ill-conditioned-batchnorm",
        _W,
        "ill-conditioned BatchNorm: gamma / sqrt(var + eps) so large that folding amplifies rounding",
        "What: in some channels |gamma| / sqrt(running_var + eps) exceeds the threshold (default\n"
        "1000): the BatchNorm multiplies that channel's values, and their rounding error, by it.\n"
        "Why: folding moves that factor into the weights; the folded layer's float32 rounding is\n"
        "then amplified too, and a fold the proof undoes for this reason says so (FD207).\n"
        "Fix: recalibrate the statistics (`bnrewrite recalibrate`); a tiny running_var usually\n"
        "means dead or nearly constant channels. Threshold: [tool.bnrewrite.precision]\n"
        "ill-conditioned-scale.",
    ),
    Code(
        "PR005",
        "dead-channel",
        _I,
        "a folded output channel is constant (all-zero folded weights)",
        "What: a folded layer's output channel has only zero weights (gamma was 0): it outputs\n"
        "its bias whatever the input.\n"
        "Why: the channel costs compute and memory for a constant; pruning it (and folding the\n"
        "constant into the next layer's bias) is exact.\n"
        "Fix: prune the channel with your pruning tool; nothing to do for correctness.",
    ),
    Code(
        "EQ101",
        "equalized",
        _I,
        "two layers' shared channels rescaled to equal weight ranges (cross-layer equalization)",
        "What: `bnrewrite equalize` divided the first layer's output channels (weights and bias) by\n"
        "a per-channel scale s > 0 and multiplied the second layer's matching input weights by s;\n"
        "the ops between are positive-homogeneous (ReLU, LeakyReLU, PReLU, pooling, nearest\n"
        "upsampling, concat slices, channel-keeping reshapes), so the model computes the same.\n"
        "Why: equal ranges per channel let per-tensor int8 weight quantization keep every channel\n"
        "(Nagel et al. 2019, 'Data-Free Quantization').\n"
        "Fix: nothing to fix; the message gives the range of the scales.",
    ),
    Code(
        "EQ201",
        "not-equalizable",
        _I,
        "two layers joined by an op that is not positive-homogeneous: not equalized",
        "What: a layer's output reaches the next layer through ReLU6, SiLU, hard-swish, GELU,\n"
        "sigmoid, tanh or a similar op.\n"
        "Why: such an op does not commute with a per-channel scale (ReLU6 clips at 6 whatever the\n"
        "scale; SiLU(x/s) != SiLU(x)/s), so rescaling the channels would change the model.\n"
        "Fix: none exact. ReLU6 can be replaced by ReLU with care (retraining), or quantize those\n"
        "layers per channel.",
    ),
    Code(
        "EQ202",
        "equalization-weakened",
        _I,
        "full equalization would lower the int8 output SQNR on the example inputs: weakened or not applied",
        "What: with every pair's scales applied, per-tensor int8 weights gave a lower output SQNR\n"
        "on the example inputs than the unequalized model; equalize applied the scales to a\n"
        "power (0.5, then 0.25), or not at all, whichever first did not lower it.\n"
        "Why: equal weight ranges make each layer's int8 weights more precise, but a layer's\n"
        "quantization noise reaches the output scaled by what follows it; the tool measures\n"
        "instead of assuming. The message gives the SQNR of each strength tried.\n"
        "Fix: nothing to fix; per-channel quantization avoids the question.",
    ),
    Code(
        "FD111",
        "kept-for-target-dtype",
        _W,
        "BatchNorm kept: folding would overflow the target dtype or worsen its error",
        "What: with `--target-dtype fp16|bf16` (`fold(..., target_dtype=...)`), this BatchNorm is\n"
        "not folded: the folded weights would exceed the dtype's range, or running the folded layer\n"
        "in that dtype would be more than twice as far from float64 as running the original layer\n"
        "and BatchNorm in it.\n"
        "Why: a fold is only worth shipping if it is as accurate in the dtype the model runs in.\n"
        "Fix: none needed; recalibrate the statistics if the BatchNorm is ill-conditioned (PR004).",
    ),
    Code(
        "FD112",
        "norm-affine",
        _I,
        "norm affine folded into the layers that read it, or why it stays",
        "What: with `--norm-affine` (`fold(..., norm_affine=True)`), the elementwise affine\n"
        "(weight, bias) of a LayerNorm, RMSNorm (torch's, or any module computing\n"
        "`normalize(x) * weight`), GroupNorm or InstanceNorm moves into every Linear (affine on the\n"
        "last axis) or conv without zero padding (affine on the channel axis) that reads the norm's\n"
        "output: W (g * n + b) + c = (W diag(g)) n + (W b + c). The norm keeps normalizing with no\n"
        "affine (torch's classes) or weight 1 and bias 0. Exact; proven per layer against float64.\n"
        "Why: rotation- and smoothing-based quantization (QuaRot, SpinQuant, SmoothQuant) needs\n"
        "norms without an affine; one multiply-add per element less at run time.\n"
        "When it stays, the message says why: another reader (a residual, an activation, the\n"
        "model's output) needs the affine output, a reader reads another axis or pads with zeros,\n"
        "the norm or a reader runs several times, or another fold changes the same layer.\n"
        "Fix: none needed; an affine that stays is exact as it is.",
    ),
]

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
