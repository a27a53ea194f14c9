"""Wall-clock of a BISE extraction: cached (frozen prefix, bottleneck features, autograd-free head
steps, frozen passes reused while the masks are unchanged) vs the straightforward loop that
recomputes everything (ExtractConfig.cache_features=False: the network runs at every head step
and every evaluation, heads train through autograd). Both loops draw the same batches and must
give the same masks (asserted).

Schedules: "small" scales the paper's down to 10 mask epochs with a halving after each (head
refits after 9 of them) and 5 head epochs per phase, i.e. the paper's ratio of head epochs (500 +
the skipped final refit) to mask epochs (100); "paper" is the paper's own (100 mask epochs, 50
head epochs per phase), run only with BISE_BENCH_PAPER=1 (minutes). Data: colored-digits (1,258
training images, 3x8x8), untrained models, single thread. With --benchmark-disable: 1 mask epoch,
1 head epoch on 200 images (a smoke run).

``python benchmarks/bench_extract.py --schedule small|paper --rounds N`` runs the two loops in
interleaved rounds in one process (cached, straightforward, cached, ...) and prints the median
wall clock of each, their ratio and the phases (``sub.info["timing_seconds"]``) as JSON, with the
machine, torch version and commit: the figures of docs/workflow.md.
"""

import argparse
import dataclasses
import json
import os
import statistics
import time

import pytest
import torch

from bise.extract import ExtractConfig, extract
from bise.models import build_model
from bise_kernels.info import cpu_description, source_commit

ARCHS = {"mlp": 1.0, "simple-cnn": 0.5}
SCHEDULES = {"small": dict(mask_epochs=10, head_epochs=5), "paper": dict(mask_epochs=100, head_epochs=50)}
_masks: dict = {}


@pytest.fixture(scope="module")
def digits():
    # extract() calls torch.use_deterministic_algorithms, whose first call imports torch._inductor
    # (about 2 s, once per process): paid here, not by whichever loop happens to run first
    torch.use_deterministic_algorithms(torch.are_deterministic_algorithms_enabled(),
                                       warn_only=torch.is_deterministic_algorithms_warn_only_enabled())
    return pytest.importorskip("bise.data").load("colored-digits", seed=0)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "straightforward"])
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_extract_wall_clock(benchmark, digits, schedule, arch, cache):
    if schedule == "paper" and (benchmark.disabled or os.environ.get("BISE_BENCH_PAPER") != "1"):
        pytest.skip("the paper schedule runs for minutes: set BISE_BENCH_PAPER=1")
    benchmark.group = f"extract {arch} {schedule}"
    data = digits
    config = ExtractConfig(**SCHEDULES[schedule], cache_features=cache)
    if benchmark.disabled:
        data = dataclasses.replace(digits, train=digits.train.subset(torch.arange(200)))
        config = dataclasses.replace(config, mask_epochs=1, head_epochs=1)
    torch.manual_seed(0)
    model = build_model(arch, data.num_classes, data.input_shape, width=ARCHS[arch]).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sub = benchmark.pedantic(extract, args=(model, data), kwargs={"config": config, "quiet": True},
                                 rounds=1 if benchmark.disabled or schedule == "paper" else 3, iterations=1)
    finally:
        torch.set_num_threads(threads)
    assert sub.info["prefix_cached"] == cache
    key = (schedule, arch, benchmark.disabled)
    if cache:
        _masks[key] = sub.masks
    elif key in _masks:
        assert all(torch.equal(_masks[key][n], sub.masks[n]) for n in sub.masks), "the two loops differ"
    benchmark.extra_info.update(units_kept=sub.units_kept, units_total=sub.units_total,
                                mask_epochs=config.mask_epochs, head_epochs=config.head_epochs,
                                train_images=len(data.train), timing_seconds=sub.info["timing_seconds"])


def _machine() -> str:
    return f"{cpu_description()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description="cached vs straightforward extraction, interleaved rounds")
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="small")
    parser.add_argument("--arch", choices=list(ARCHS), action="append", help="default: all")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(False)  # the one-time _inductor import, before any timing
    from bise.data import load

    data = load("colored-digits", seed=0)
    out = {"machine": _machine(), "torch": torch.__version__, **source_commit(), "threads": 1,
           "schedule": args.schedule, "rounds": args.rounds, "archs": {}}
    for arch in args.arch or list(ARCHS):
        runs = {True: [], False: []}
        for _ in range(args.rounds):
            masks = {}
            for cache in (True, False):
                torch.manual_seed(0)
                model = build_model(arch, data.num_classes, data.input_shape, width=ARCHS[arch]).eval()
                start = time.perf_counter()
                sub = extract(model, data, config=ExtractConfig(**SCHEDULES[args.schedule], cache_features=cache),
                              quiet=True)
                runs[cache].append((time.perf_counter() - start, sub.info["timing_seconds"]))
                masks[cache] = sub.masks
            assert all(torch.equal(masks[True][n], masks[False][n]) for n in masks[True]), "the two loops differ"
        result = {}
        for cache, name in ((True, "cached"), (False, "straightforward")):
            seconds = [r[0] for r in runs[cache]]
            phases = {k: statistics.median(r[1].get(k, 0.0) for r in runs[cache]) for k in runs[cache][0][1]}
            result[name] = {"seconds": statistics.median(seconds), "rounds": seconds, "phases": phases}
        result["ratio"] = result["straightforward"]["seconds"] / result["cached"]["seconds"]
        result["masks_equal"] = True
        out["archs"][arch] = result
        print(json.dumps({arch: result}), flush=True)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
