"""Benchmark `bnrewrite.fold` against `torch.fx.experimental.optimization.fuse`, in one process.

Prints ratios, not absolute timings: BN layers removed (bnrewrite vs fuse), rewrite wall time
(bnrewrite / fuse), extra peak memory during the rewrite as a fraction of the model's size,
time-per-layer scaling (1000 blocks / 10 blocks) and folded-model latency against the same model
with every BatchNorm deleted.

Peak memory (measured in a fresh subprocess per rewrite, so no freed memory is reused) is the
process's resident-set high-water mark (``/proc/self/status`` VmHWM, reset
through ``/proc/self/clear_refs``), with glibc's mmap threshold pinned so freed tensors go back
to the OS (each memory worker re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` set; timings
run with the default allocator, as a user's process does; the 300-block figures are printed a
second time with the default allocator too, median of 3 fresh processes). Linux only.

The "checks" section counts forward passes of a segmentation-sized model (1024x2048 input)
during ``fold`` with its default checks: a dispatch-mode counter of convolutions executed,
divided by the convolutions of one forward pass.

Usage: python benchmarks/fold.py [--blocks 10,30,100,300,1000] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import os
import statistics
import sys
import time
import warnings

if (
    "--memory-worker" in sys.argv
    and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None
    and not os.environ.get("BENCH_DEFAULT_MALLOC")
    and sys.platform.startswith("linux")
):
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bnrewrite  # noqa: E402
from bnrewrite.verify import verify  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def synthetic_resnet(blocks: int, width: int = 64) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *[Block(width) for _ in range(blocks)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    )
    return with_running_stats(model, seed=blocks)


def with_running_stats(model: nn.Module, seed: int) -> nn.Module:
    """Seeded trained-looking running statistics; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def count_bn(model: nn.Module) -> int:
    if isinstance(model, torch.fx.GraphModule):
        return sum(
            1
            for n in model.graph.nodes
            if (
                n.op == "call_module"
                and isinstance(model.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
            )
            or (n.op == "call_function" and "batch_norm" in str(n.target))
        )
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def extra_peak_bytes(fn) -> tuple[int, object]:
    """Peak RSS growth while running fn (result kept alive until measured)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS:")
    result = fn()
    peak = _status("VmHWM:")
    return peak - base, result


def memory_in_fresh_process(mode: str, blocks: int, default_malloc: bool = False) -> int:
    """Extra peak RSS of one rewrite, measured in a new process (no memory reused from earlier
    runs); ``default_malloc``: with glibc's own allocator settings, as a user's process runs."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if default_malloc:
        env["BENCH_DEFAULT_MALLOC"] = "1"
    out = subprocess.run(
        [sys.executable, __file__, "--memory-worker", mode, str(blocks)],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return int(out.stdout.strip().splitlines()[-1])


def memory_worker(mode: str, blocks: int) -> None:
    torch.manual_seed(0)  # the same input every run: a float64 judgement is not left to chance
    x = (torch.randn(1, 3, 8, 8),)

    def rewrite(model: nn.Module):
        return {
            "trace": lambda: torch.fx.symbolic_trace(model),
            "ours": lambda: bnrewrite.fold(model, x),
            "inplace": lambda: bnrewrite.fold(model, x, inplace=True),
            "ours-noinputs": lambda: bnrewrite.fold(model),
            "inplace-noinputs": lambda: bnrewrite.fold(model, inplace=True),
            "fuse": lambda: fuse(model),
        }[mode]()

    rewrite(synthetic_resnet(2))  # warm-up: one-time initialization is not the rewrite's cost
    model = synthetic_resnet(blocks)
    extra, _result = extra_peak_bytes(lambda: rewrite(model))
    print(extra)


def best_times(fns: list, repeats: int) -> list[float]:
    """Best time of each function over ``repeats`` interleaved rounds (each round runs every
    function once): load on the machine hits them alike, not one run of one of them."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, took in zip(fns, times):
            gc.collect()
            t = time.perf_counter()
            fn()
            took.append(time.perf_counter() - t)
    return [min(t) for t in times]


def bn_deleted(model: nn.Module) -> nn.Module:
    stripped = copy.deepcopy(model)
    for name, m in list(stripped.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            parent, _, leaf = name.rpartition(".")
            setattr(stripped.get_submodule(parent) if parent else stripped, leaf, nn.Identity())
    return stripped


def latency_ratio(a: nn.Module, b: nn.Module, x: torch.Tensor, rounds: int = 100) -> float:
    """Median over interleaved rounds of latency(a) / latency(b), so both share machine noise."""
    ratios = []
    with torch.no_grad():
        for _ in range(5):
            a(x), b(x)
        for i in range(rounds):
            first, second = (a, b) if i % 2 == 0 else (b, a)
            t0 = time.perf_counter()
            first(x)
            t1 = time.perf_counter()
            second(x)
            t2 = time.perf_counter()
            ta, tb = (t1 - t0, t2 - t1) if first is a else (t2 - t1, t1 - t0)
            ratios.append(ta / tb)
    return statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="10,30,100,300,1000")
    ap.add_argument("--quick", action="store_true", help="fewer repeats (for smoke runs)")
    ap.add_argument("--sections", default="samples,scaling,checks,latency")
    ap.add_argument("--memory-worker", nargs=2, metavar=("MODE", "BLOCKS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker[0], int(args.memory_worker[1]))
        return
    sizes = [int(b) for b in args.blocks.split(",")]
    x_small = (torch.randn(1, 3, 8, 8),)

    sections = set(args.sections.split(","))
    if "samples" in sections:
        samples_section()
    if "scaling" in sections:
        scaling_section(sizes, args.quick, x_small)
    if "checks" in sections:
        checks_section()
    if "latency" in sections:
        latency_section()


def samples_section() -> None:
    print("## Samples: BatchNorm layers removed (and whether the result still computes the same)")
    print(f"{'model':16} {'BN':>4} {'fuse':>5} {'fuse ok':>8} {'bnrewrite':>9} {'ok':>4}  (+scale-shift)")
    for name in importlib.import_module("samples").NAMES:
        mod = importlib.import_module(f"samples.{name}")
        model, inputs = mod.build(), mod.example_inputs()
        total = sum(n.family in ("batch", "frozen", "affine") for n in bnrewrite.analyze(model, inputs).norms)
        try:
            fused_model = fuse(model)
            fused = count_bn(torch.fx.symbolic_trace(model)) - count_bn(fused_model)  # BN calls it removed
            fuse_ok = "yes" if verify(model, fused_model, inputs).passed else "NO"
        except Exception:
            fused, fuse_ok = 0, "n/a"  # fuse cannot trace it
        folded, report = bnrewrite.fold(model, inputs)
        ok = "yes" if verify(model, folded, inputs).passed else "NO"
        kinds = [a.kind for a in report.actions]
        ours = sum(k.startswith("fold") or k == "merge-branches" for k in kinds)  # BNs gone
        print(
            f"{name:16} {total:4d} {fused:5d} {fuse_ok:>8} {ours:9d} {ok:>4}  (+{kinds.count('scale-shift')})"
        )
        assert ours >= fused or fuse_ok != "yes", name  # a fuse that changes the result counts for nothing


def scaling_section(sizes: list[int], quick: bool, x_small: tuple[torch.Tensor, ...]) -> None:
    print("\n## Synthetic ResNets (width 64): ratios against torch.fx fuse")
    print("time: fold / fuse, with example inputs (default checks: eager pass + proof) and without")
    print("(best of interleaved rounds);")
    print("memory: extra peak RSS / model size, fresh process each")
    header = (
        f"{'blocks':>6} {'BN removed (ours/fuse)':>22} {'time':>6} {'time, no inputs':>15} "
        f"{'mem':>6} {'mem inplace':>11} {'mem, no inputs':>14} {'inplace, no inputs':>18} "
        f"{'mem fuse':>8} {'mem trace':>9}"
    )
    print(header)
    per_layer = {}
    modes = ("ours", "inplace", "ours-noinputs", "inplace-noinputs", "fuse", "trace")
    for n in sizes:
        model = synthetic_resnet(n)
        size = model_bytes(model)
        repeats = 1 if quick else (5 if n >= 300 else 9)
        t_fuse, t_ours, t_bare = best_times(
            [
                lambda model=model: fuse(model),
                lambda model=model: bnrewrite.fold(model, x_small),
                lambda model=model: bnrewrite.fold(model),
            ],
            repeats,
        )
        per_layer[n] = t_ours / (2 * n + 1)
        removed_fuse = count_bn(model) - count_bn(fuse(model))
        removed_ours = count_bn(model) - count_bn(bnrewrite.fold(model, x_small).model)
        mem = {mode: memory_in_fresh_process(mode, n) / size for mode in modes}
        print(
            f"{n:6d} {removed_ours:10d}/{removed_fuse:<11d} {t_ours / t_fuse:6.2f} {t_bare / t_fuse:15.2f} "
            f"{mem['ours']:6.2f} {mem['inplace']:11.2f} {mem['ours-noinputs']:14.2f} "
            f"{mem['inplace-noinputs']:18.2f} {mem['fuse']:8.2f} {mem['trace']:9.2f}"
        )
        assert removed_ours >= removed_fuse
    if 300 in sizes:
        default_malloc_line(300)
    if 10 in per_layer and 1000 in per_layer:
        print(
            f"\ntime per layer (default, with inputs), 1000 blocks / 10 blocks: {per_layer[1000] / per_layer[10]:.2f}"
        )


def default_malloc_line(n: int) -> None:
    """The same memory figures with glibc's default allocator (median of 3 fresh processes): freed
    memory it keeps for reuse counts in the peak, so these are what a user's process sees."""
    size = model_bytes(synthetic_resnet(n))
    figures = []
    for mode in ("ours", "inplace", "fuse", "trace"):
        runs = sorted(memory_in_fresh_process(mode, n, default_malloc=True) / size for _ in range(3))
        figures.append(f"{mode} {runs[1]:.2f}")
    print(f"{n} blocks, glibc's default allocator: " + ", ".join(figures))


def segmentation_net(width: int = 16, depth: int = 6, decoder: bool = False) -> nn.Module:
    """Conv-BN-ReLU stack; ``decoder``: stride-2 stem, bias-free transposed convs + BN at the end
    (what the speed check, FD108, times)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, stride=2 if decoder else 1, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    if decoder:
        layers += [nn.ConvTranspose2d(width, width, 1, groups=4, bias=False), nn.BatchNorm2d(width)]
        layers += [nn.ConvTranspose2d(width, width, 2, stride=2, bias=False), nn.BatchNorm2d(width)]
    layers += [nn.Conv2d(width, 19, 1)]
    return with_running_stats(nn.Sequential(*layers), seed=0)


class ConvCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts convolutions on full-size activations (the speed check times layers on inputs
    shrunk to at most 2^18 elements; those are not forward passes of the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.convolution and args[0].numel() > (1 << 18):
            self.convs += 1
        return func(*args, **(kwargs or {}))


def checks_section() -> None:
    print("\n## Checks on a large input: forward passes during fold (default checks)")
    for decoder in (False, True):
        _checks_on(segmentation_net(decoder=decoder), "with a transposed-conv decoder" if decoder else "")


def _checks_on(model: nn.Module, label: str) -> None:
    x = torch.randn(1, 3, 1024, 2048)
    with ConvCounter() as one, torch.no_grad():
        model(x)
    t = time.perf_counter()
    with torch.no_grad():
        model(x)
    t_forward = time.perf_counter() - t
    with ConvCounter() as during:
        t = time.perf_counter()
        _folded, report = bnrewrite.fold(model, (x,))
        t_fold = time.perf_counter() - t
    print(
        f"segmentation net 1x3x1024x2048 {label}: {during.convs / one.convs:.2f} forward passes "
        f"(proof reports {report.extra['proof']['forward_passes']} run of the result); "
        f"fold time / one forward pass: {t_fold / t_forward:.2f}; "
        f"{sum(d.code == 'FD108' for d in report.diagnostics)} kept by the speed check"
    )


def latency_section() -> None:
    print("\n## Latency: folded model / same model with every BatchNorm deleted")
    print("(both as fx graphs; median of per-round ratios over 100 interleaved rounds)")
    cases = [
        (f"resnet-{n} blocks, 8x3x32x32", synthetic_resnet(n), torch.randn(8, 3, 32, 32)) for n in (10, 30)
    ]
    cases.append(
        (
            "mobilenet sample, 8x3x64x64",
            importlib.import_module("samples.mobilenet").build(),
            torch.randn(8, 3, 64, 64),
        )
    )
    for label, model, x in cases:
        folded = bnrewrite.fold(model, (x,)).model
        stripped = torch.fx.symbolic_trace(bn_deleted(model))
        print(f"{label}: {latency_ratio(folded, stripped, x):.3f}")


if __name__ == "__main__":
    main()
