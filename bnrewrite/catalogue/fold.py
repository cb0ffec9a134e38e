"""Fold codes: FD1xx say what a fold does with a norm, FD2xx why a BatchNorm cannot be folded
into a neighbour."""

from __future__ import annotations

from bnrewrite.diagnostics import Code, Severity

_W, _E, _I = Severity.WARNING, Severity.ERROR, Severity.INFO

CODES = [
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
