"""The real-library corpus: bnrewrite's fold on the most widely used vision-model library.

Not part of CI, and the library is no dependency: run it in the private environment that
``../shared/corpora/timm-venv.sh`` builds (it prints its python)::

    PY=$(../shared/corpora/timm-venv.sh) && $PY benchmarks/corpus.py [--models a,b] [--jobs 2]

Every model is built without weights, its BatchNorm statistics and affine parameters seeded,
and folded with default options on one input of its default size, each in a fresh process (as
a CLI user pays it). Per model:

- ``bn``: BatchNorm calls executed before -> after (ATen ops counted by a dispatch mode);
- ``limit``: torch.export's structural limit - BatchNorms of the exported graph whose input is a
  conv/linear output that nothing else reads (what an exporter's own conv+BN fold reaches);
- ``folds``: BatchNorm folds (and merges) the report calls applied, against BatchNorm calls
  gone; per-channel affine layers that fold are counted apart (``affine``);
- ``FD207``: folds the proof undid; ``proof``: whether the proof passed;
- ``err``: the folded model's max error against float64, over the original's own;
- ``ops``: executed ATen ops before -> after; for branch-built models also the library's own
  ``reparameterize_model`` and our ops over its ops;
- ``time``: the fold call, seconds (cold: first call in a fresh process).

Then one total line. Exit status 0 unless the library does not import (then it says so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# At least one model per family with BatchNorm or a per-channel affine layer (timm 1.0.x names).
MODELS = [
    # ResNet family and variants
    "resnet18", "resnet50", "resnet26d", "resnet152", "resnext26ts", "seresnext26d_32x4d",
    "ecaresnet26t", "resnetrs50", "resnetv2_50", "skresnet18", "res2net50_14w_8s", "resnest14d",
    "gernet_s", "regnetx_002", "regnety_002", "regnetz_b16", "tresnet_m", "selecsls42b", "dla34",
    "dpn48b", "densenet121", "hrnet_w18_small", "inception_v3", "inception_v4",
    "inception_resnet_v2", "xception41", "legacy_xception", "cspresnet50", "cspdarknet53",
    "cs3darknet_s", "darknet17", "darknet53", "ese_vovnet19b_dw", "vovnet39a", "botnet26t_256",
    "halonet26t", "lambda_resnet26t", "resnet18d", "nf_resnet26", "rexnet_100", "sebotnet33ts_256",
    # Mobile / NAS families
    "mobilenetv2_100", "mobilenetv3_large_100", "mobilenetv3_small_100", "mobilenetv4_conv_small",
    "mobilenetv4_hybrid_medium", "efficientnet_b0", "efficientnet_lite0", "efficientnetv2_rw_t",
    "tf_efficientnet_b0", "tf_mixnet_s", "mixnet_s", "mnasnet_100", "semnasnet_075", "spnasnet_100",
    "fbnetc_100", "fbnetv3_b", "lcnet_050", "tinynet_e", "hardcorenas_a", "ghostnet_100",
    "ghostnetv2_100", "ghostnetv3_100", "hgnet_tiny", "hgnetv2_b0", "mobilevit_xxs",
    "mobilevitv2_050", "efficientvit_b0", "efficientvit_m0", "tiny_vit_5m_224",
    "efficientformer_l1", "efficientformerv2_s0", "levit_128s", "coatnet_nano_rw_224",
    "coat_lite_tiny", "visformer_tiny", "convmixer_768_32", "inception_next_tiny", "rdnet_tiny",
    "nest_tiny", "resmlp_12_224", "cait_xxs24_224", "poolformer_s12", "convit_tiny",
    # Branch-built (structural reparameterization)
    "repvgg_a0", "repvgg_b1g4", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "repghostnet_050",
    "ghostnetv3_050",
]  # fmt: skip
BRANCH_BUILT = {
    "repvgg_a0", "repvgg_b1g4", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "repghostnet_050",
    "ghostnetv3_050", "ghostnetv3_100",
}  # fmt: skip

BN_OPS = {
    "native_batch_norm",
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit",
    "batch_norm",
}
BN_OPS |= {
    "cudnn_batch_norm",
    "miopen_batch_norm",
    "_batch_norm_impl_index",
    "_native_batch_norm_legit_functional",
}


def _count_ops(model, inputs):
    """Executed ATen ops of one forward pass (``benchmarks/ops.py``'s counter)."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    threads = torch.get_num_threads()
    from ops import count_ops  # (sets its own thread count on import: every figure here uses one)

    torch.set_num_threads(threads)
    return count_ops(model, inputs)


def _seeded(model):
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def _export_limit(model, inputs) -> int | None:
    """BatchNorms of torch.export's graph that an exporter's conv+BN fold reaches: the input is a
    convolution/linear output read by nothing else (shape reads aside)."""
    import torch

    from bnrewrite.semantics.readers import value_readers

    try:
        ep = torch.export.export(model, inputs, strict=False)
    except Exception:
        return None
    layers = {"convolution", "conv2d", "conv1d", "conv3d", "linear", "addmm", "conv_transpose2d"}
    count = 0
    for n in ep.graph_module.graph.nodes:
        name = getattr(getattr(n.target, "overloadpacket", None), "__name__", "")
        if n.op != "call_function" or name not in BN_OPS:
            continue
        src = n.args[0]
        src_name = getattr(getattr(src.target, "overloadpacket", None), "__name__", "")
        if src_name in layers and len(value_readers(src)) == 1:
            count += 1
    return count


def _onnx_nodes(model, inputs) -> tuple[int, int] | None:
    """(nodes, BatchNormalization nodes) of ``torch.onnx.export(dynamo=True, optimize=True)``."""
    import tempfile

    import onnx
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.onnx")
        try:
            torch.onnx.export(model, inputs, path, dynamo=True, optimize=True, verbose=False)
        except Exception:
            return None
        graph = onnx.load(path).graph
    nodes = list(graph.node)
    return len(nodes), sum(n.op_type == "BatchNormalization" for n in nodes)


def run_one(name: str, onnx: bool = False) -> dict:
    """One model, in this process (the worker)."""
    import warnings

    warnings.filterwarnings("ignore")
    import timm
    import torch

    torch.set_num_threads(1)
    import bnrewrite

    torch.manual_seed(0)
    model = _seeded(timm.create_model(name, pretrained=False))
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = (torch.randn(1, *size, generator=torch.Generator().manual_seed(1)),)
    t0 = time.perf_counter()
    folded, report = bnrewrite.fold(model, x)
    seconds = time.perf_counter() - t0
    before, after = _count_ops(model, x), _count_ops(folded, x)
    codes = Counter(d.code for d in report.diagnostics)
    applied = [a for a in report.actions if a.kind.startswith("fold") or a.kind == "merge-branches"]
    bn_folds = sum(_is_batchnorm(model, a) for a in applied)
    affine_folds = sum(a.kind.startswith("fold") and not _is_batchnorm(model, a) for a in applied)
    result = bnrewrite.verify(model, folded, x, random_sets=0)
    worst = max(result.checks, key=lambda c: c.max_abs_error / max(c.original_abs_error, 1e-30))
    out = {
        "model": name,
        "class_kept": type(folded) is type(model),
        "bn_before": sum(before[k] for k in BN_OPS),
        "bn_after": sum(after[k] for k in BN_OPS),
        "ops_before": sum(before.values()),
        "ops_after": sum(after.values()),
        "folds": bn_folds,
        "affine_folds": affine_folds,
        "fd207": codes.get("FD207", 0),
        "proof": (report.extra.get("proof") or {}).get("passed"),
        "err_ratio": worst.max_abs_error / max(worst.original_abs_error, 1e-30),
        "verify": result.passed,
        "seconds": seconds,
        "limit": _export_limit(model, x),
    }
    if onnx:
        out["onnx"] = {"exporter": _onnx_nodes(model, x), "bnrewrite": _onnx_nodes(folded, x)}
    if name in BRANCH_BUILT:
        import copy

        from timm.utils.model import reparameterize_model

        ref = reparameterize_model(copy.deepcopy(model))
        out["reparam_ops"] = sum(_count_ops(ref, x).values())
    return out


def _is_batchnorm(model, action) -> bool:
    """The action's layer is a BatchNorm (a module with running statistics, or a functional
    ``batch_norm`` call), not another per-channel affine layer or a BatchNorm-free branch set."""
    path = action.module_path
    if path:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if module is not None:
            return "running_var" in module._buffers
    return "batch_norm" in (action.node or "")


def _row(r: dict) -> str:
    if "error" in r:
        return f"{r['model']:<28} ERROR {r['error']}"
    limit = "-" if r["limit"] is None else r["limit"]
    gone = r["bn_before"] - r["bn_after"]
    text = (
        f"{r['model']:<28} bn {r['bn_before']:>3}->{r['bn_after']:<3} limit {limit:>3}  "
        f"folds {r['folds']:>3} gone {gone:>3} affine {r['affine_folds']:>2}  FD207 {r['fd207']:>2}  "
        f"proof {'ok' if r['proof'] else r['proof']}  err {r['err_ratio']:.2f}x  "
        f"ops {r['ops_before']}->{r['ops_after']}  {r['seconds']:.2f}s"
    )
    if r.get("onnx"):
        e, b = r["onnx"]["exporter"], r["onnx"]["bnrewrite"]
        text += f"  onnx {e[0] if e else '-'}/{e[1] if e else '-'} BN -> {b[0] if b else '-'}/{b[1] if b else '-'} BN"
    if "reparam_ops" in r:
        text += f"  reparam {r['reparam_ops']} ({r['ops_after'] / r['reparam_ops']:.2f}x)"
    if not r["class_kept"]:
        text += "  CLASS LOST"
    return text


def _worker(name: str, timeout: int, onnx: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name] + (["--onnx"] if onnx else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"timed out after {timeout}s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": name, "error": tail[:200]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated model names (default: the corpus)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--json", help="write every row to this file")
    parser.add_argument(
        "--onnx", action="store_true", help="also count ONNX nodes, exporter alone vs after fold"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        try:
            print(json.dumps(run_one(args.one, args.onnx)))
        except Exception as exc:
            print(json.dumps({"model": args.one, "error": f"{type(exc).__name__}: {exc}"[:300]}))
        return 0
    try:
        import timm
    except ImportError:
        print("timm does not import here: run this with the python ../shared/corpora/timm-venv.sh prints")
        return 0
    names = args.models.split(",") if args.models else MODELS
    print(f"timm {timm.__version__}: {len(names)} models, {args.jobs} at a time, one fresh process each")
    from concurrent.futures import ThreadPoolExecutor

    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for r in pool.map(lambda n: _worker(n, args.timeout, args.onnx), names):
            rows.append(r)
            print(_row(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(_total(rows))
    return 0


def _total(rows: list[dict]) -> str:
    ok = [r for r in rows if "error" not in r]
    limited = [r for r in ok if r["limit"] is not None]
    at_limit = sum(r["bn_before"] - r["bn_after"] >= r["limit"] for r in limited)
    honest = sum(r["folds"] == r["bn_before"] - r["bn_after"] for r in ok)
    more_ops = sum(r["ops_after"] > r["ops_before"] for r in ok)
    branch = [r for r in ok if "reparam_ops" in r]
    within = sum(r["ops_after"] <= 1.05 * r["reparam_ops"] for r in branch)
    return (
        f"TOTAL {len(ok)}/{len(rows)} models ran; BatchNorm calls {sum(r['bn_before'] for r in ok)} -> "
        f"{sum(r['bn_after'] for r in ok)}; at or past the export limit {at_limit}/{len(limited)}; "
        f"FD207 {sum(r['fd207'] for r in ok)}; reported folds == calls gone {honest}/{len(ok)}; "
        f"proof passed {sum(bool(r['proof']) for r in ok)}/{len(ok)}; verify passed "
        f"{sum(r['verify'] for r in ok)}/{len(ok)}; worst err {max((r['err_ratio'] for r in ok), default=0):.2f}x; "
        f"more ops {more_ops}; class kept {sum(r['class_kept'] for r in ok)}/{len(ok)}; "
        f"branch-built within 1.05x of reparameterize_model {within}/{len(branch)}; "
        f"fold time {sum(r['seconds'] for r in ok):.1f}s" + _onnx_total(ok)
    )


def _onnx_total(rows: list[dict]) -> str:
    pairs = [r["onnx"] for r in rows if r.get("onnx") and r["onnx"]["exporter"] and r["onnx"]["bnrewrite"]]
    if not pairs:
        return ""
    never_more = sum(p["bnrewrite"][0] <= p["exporter"][0] for p in pairs)
    with_bn = [p for p in pairs if p["exporter"][1]]
    fewer = sum(p["bnrewrite"][0] < p["exporter"][0] for p in with_bn)
    return (
        f"; ONNX never more nodes {never_more}/{len(pairs)}, strictly fewer where the exporter "
        f"leaves a BatchNormalization {fewer}/{len(with_bn)}"
    )


if __name__ == "__main__":
    sys.exit(main())
