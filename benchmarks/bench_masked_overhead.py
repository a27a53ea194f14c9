"""Per-call host cost of the public masked ops: forward + backward against the dense op of each.

The CPU analogue of the GPU per-call target (docs/masked.md, "Per-call overhead"): at 8x8, batch 2
kernel time is negligible and what remains is what a GPU call pays on the host; at 256x256, batch 32
the kernels count too. Every call is a forward, ``.sum()`` and ``.backward()``; the calls run
interleaved round by round on one thread, each call timed alone; per call the minimum and median
(us) and the ratio of medians to the call's own dense op (:func:`base`) are reported (medians of single
calls: a preempted call on a loaded machine moves them little). "(cached)": the scores do not change
between calls, so the module's selection is reused; "(step)": they change before every call (an in-place update under
no_grad, which dense pays nothing for), as in training. ``python benchmarks/bench_masked_overhead.py``
prints the table (``--rounds``, ``--calls``); ``pytest benchmarks/bench_masked_overhead.py --benchmark-only
--benchmark-json=...`` records it (every row's min, median and ratios in ``extra_info``, the machine, torch and
commit beside them) for the README's tables; with ``--benchmark-disable`` (scripts/test.sh) one short run
checks every call works.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import bise_kernels as bk

SIZES = ((8, 2), (256, 32))
"""(features, batch): the tiny layer (host cost only) and the GPU target's layer."""


def calls(features: int, batch: int) -> dict[str, Callable[[], None]]:
    """Forward + backward of each public path on one layer size (dense first: the ratios' base)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, features, generator=g, requires_grad=True)
    w = torch.randn(features, features, generator=g, requires_grad=True)
    s = torch.randn(features, features, generator=g, requires_grad=True)
    layer = bk.MaskedLinear(features, features, bias=False, density=0.5)
    keep = bk.MaskedLinear(features, features, bias=False, density=0.5, mask_mode="keep")
    by_threshold = bk.MaskedLinear(features, features, bias=False, threshold=0.0)
    stepped = {rule: bk.MaskedLinear(features, features, bias=False, **{rule: value})
               for rule, value in (("threshold", 0.0), ("density", 0.5))}
    channels = max(features // 4, 1)
    gate = bk.ChannelGate(channels, temperature=0.5)
    gate_stepped = bk.ChannelGate(channels, temperature=0.5)
    xg = torch.randn(batch, channels, 4, 4, generator=g, requires_grad=True)
    conv = bk.MaskedConv2d(channels, channels, 3, padding=1, bias=False, density=0.5)
    conv_keep = bk.MaskedConv2d(channels, channels, 3, padding=1, bias=False, density=0.5, mask_mode="keep")
    wc = conv.weight.detach().clone().requires_grad_()
    xc = torch.randn(batch, channels, 4, 4, generator=g, requires_grad=True)
    return {
        "dense F.linear": lambda: F.linear(x, w).sum().backward(),
        "masked_linear(threshold=0)": lambda: bk.masked_linear(x, w, None, s, threshold=0.0).sum().backward(),
        "masked_linear(density=0.5)": lambda: bk.masked_linear(x, w, None, s, density=0.5).sum().backward(),
        "MaskedLinear (cached)": lambda: layer(x).sum().backward(),
        "MaskedLinear keep (cached)": lambda: keep(x).sum().backward(),
        "MaskedLinear threshold (cached)": lambda: by_threshold(x).sum().backward(),
        "MaskedLinear threshold (step)": lambda: _step(stepped["threshold"], x),
        "MaskedLinear density (step)": lambda: _step(stepped["density"], x),
        f"ChannelGate({channels}) (cached)": lambda: gate(xg).sum().backward(),
        f"ChannelGate({channels}) (step)": lambda: _step(gate_stepped, xg),
        "eager x * g": lambda: (xg * (gate.scores >= 0).to(xg.dtype)[:, None, None]).sum().backward(),
        f"MaskedConv2d({channels}) (cached)": lambda: conv(xc).sum().backward(),
        f"MaskedConv2d({channels}) keep (cached)": lambda: conv_keep(xc).sum().backward(),
        "dense F.conv2d": lambda: F.conv2d(xc, wc, padding=1).sum().backward(),
    }


def base(name: str) -> str:
    """The dense call a row is compared with: eager ``x * g`` for the gate, ``F.conv2d`` for the conv, else
    ``F.linear`` (every row was divided by ``F.linear``, the conv's 8x8 1.7x read as 7.6x)."""
    return "eager x * g" if name.startswith("ChannelGate") else \
        "dense F.conv2d" if name.startswith("MaskedConv2d") else "dense F.linear"


def _step(layer: torch.nn.Module, x: torch.Tensor) -> None:
    """A training step's share of the layer: its scores change (a new version, as after an optimiser
    step: the selection and its checks are made again), then forward + backward."""
    with torch.no_grad():
        layer.scores.add_(0.0)
    layer(x).sum().backward()


def measure(features: int, batch: int, rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    """min / median us per call and the ratio of medians to dense, all calls interleaved."""
    fns = calls(features, batch)
    times = {name: [] for name in fns}
    for r in range(rounds + 2):  # two warm-up rounds
        for name, fn in fns.items():
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                if r >= 2:
                    times[name].append((time.perf_counter() - start) * 1e6)
    return {name: {"min_us": min(t), "median_us": statistics.median(t), "base": base(name),
                   "ratio": statistics.median(t) / statistics.median(times[base(name)])} for name, t in times.items()}


@pytest.mark.parametrize("features,batch", SIZES, ids=[f"{f}x{f}-b{b}" for f, b in SIZES])
def test_masked_overhead(benchmark, features, batch):
    """Every call runs forward + backward, each row against the dense op of its kind; extra_info holds each
    row's min and median us and the ratios of medians and of minima (one pedantic round = the whole interleaved
    measurement, on one thread; the benchmark's own time is that round's, not a figure)."""
    small = benchmark.disabled
    benchmark.group = "masked per-call overhead cpu"
    rounds, per_round = (1, 1) if small else (20, 20)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = benchmark.pedantic(measure, args=(features, batch, rounds, per_round), rounds=1, iterations=1)
    finally:
        torch.set_num_threads(threads)
    assert all(v["min_us"] > 0 for v in result.values())
    conv = next(v for name, v in result.items() if name.startswith("MaskedConv2d"))
    assert conv["base"] == "dense F.conv2d"
    assert conv["ratio"] == conv["median_us"] / result["dense F.conv2d"]["median_us"]
    assert result["MaskedLinear (cached)"]["base"] == "dense F.linear"
    benchmark.extra_info.update(features=features, batch=batch, rounds=rounds, calls_per_round=per_round,
                                threads=1, isa=torch.backends.cpu.get_cpu_capability())
    for name, v in result.items():  # medians, and minima: on a shared VM the medians move with its load
        benchmark.extra_info[f"{name}: min_us"] = v["min_us"]
        benchmark.extra_info[f"{name}: median_us"] = v["median_us"]
        if name != v["base"]:
            benchmark.extra_info[f"{name}: over {v['base']}"] = v["ratio"]
            benchmark.extra_info[f"{name}: min over {v['base']}"] = v["min_us"] / result[v["base"]]["min_us"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=20, help="calls per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# bise_kernels from {bk.__file__}")  # run from another checkout, set PYTHONPATH to measure this one
    for features, batch in SIZES:
        print(f"# {features}x{features}, batch {batch}: min us / median us / ratio of medians to the dense op")
        for name, v in measure(features, batch, args.rounds, args.calls).items():
            print(f"{name:36s} {v['min_us']:8.1f} {v['median_us']:8.1f} {v['ratio']:6.2f} ({v['base']})")


if __name__ == "__main__":
    main()
