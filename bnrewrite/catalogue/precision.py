"""Rewrite and low-precision codes: SW0xx (swap, insert, remove, fix), PR0xx what a fold does to
low-precision deployment, EQ what cross-layer equalization does."""

from __future__ import annotations

from bnrewrite.diagnostics import Code, Severity

_W, _E, _I = Severity.WARNING, Severity.ERROR, Severity.INFO

CODES = [
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
]
