"""The GPU benchmark suite in one command: ``python benchmarks/gpu_suite.py``.

Collects the cases of every module in CASE_MODULES (format: docs/gpu_suite.md), checks each
case's result where it can, times the case and each of its baselines side by side with
triton.testing.do_bench (median, p20, p80; L2 flushed between runs) and writes
``benchmarks/results/<gpu>-<yyyymmdd>-<commit>[-<filter>].json`` with the GPU, torch/triton/CUDA versions,
the commit, and per case the timings, achieved GB/s (and TFLOP/s), the targets and the speed-up
over each baseline. The file is rewritten after every case (a killed run keeps what it
measured); each case has a time limit and the whole run a budget, after which the remaining
cases are recorded as skipped. ``--dry-run`` checks the wiring on the CPU with tiny cases and a
perf_counter timer (its JSON goes to a temporary folder unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import inspect
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CASE_MODULES = ("bench_select_gpu", "bench_masked_gpu", "bench_step_gpu", "bench_workflow_gpu")
QUANTILES = (0.5, 0.2, 0.8)
CASE_TIMEOUT_S = 90.0
BUDGET_S = 480.0


class CaseTimeout(Exception):
    """A case ran past its time limit (raised in the main thread by SIGALRM)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CaseTimeout after ``seconds`` of wall time (between Python statements)."""
    def expire(signum, frame):
        raise CaseTimeout(f"ran past {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_cases(dry_run: bool, name_filter: str = "") -> tuple[list[dict], list[dict]]:
    """Cases (whose name contains ``name_filter``) from every module that imports, and a note for
    each module or build that failed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    cases, notes = [], []
    for name in CASE_MODULES:
        try:
            module = importlib.import_module(name)
            build = getattr(module, "gpu_cases", None)
            if build is None:
                found = list(getattr(module, "GPU_CASES", []))
            elif "dry_run" in inspect.signature(build).parameters:
                found = build(dry_run=dry_run)
            elif dry_run:
                notes.append({"module": name, "note": "no dry-run cases (gpu_cases() takes no dry_run)"})
                continue
            else:
                found = build()
        except Exception as exc:  # noqa: BLE001 - one broken module must not stop the suite
            notes.append({"module": name, "note": f"{type(exc).__name__}: {exc}"})
            continue
        cases += [dict(case, module=name) for case in found if name_filter in case["name"]]
    return in_budget_order(cases), notes


def in_budget_order(cases: list[dict]) -> list[dict]:
    """The budget cuts a run from the end, so: first the default paths, the API and the training
    steps; then the Triton backend's cases, which no "auto" order takes on CUDA (docs/gpu_suite.md)
    and the dearest (every new shape compiles, and autotunes up to four tiles); last the workflow
    cases, which the device's workflow call runs first anyway (scripts/gpu_workflow.sh). Module
    order within each group."""
    return sorted(cases, key=lambda case: (case.get("module") == "bench_workflow_gpu", case.get("backend") == "triton"))


def _cpu_bench(fn, reps: int = 5) -> list[float]:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return _quantiles(times)


def _quantiles(times: list[float]) -> list[float]:
    """median / p20 / p80 (:data:`QUANTILES`) of ``times``."""
    times = sorted(times)
    return [statistics.median(times), times[round(0.2 * (len(times) - 1))], times[round(0.8 * (len(times) - 1))]]


TIMERS = ("gpu", "wall", "latency")
"""How a case is timed: "gpu", the GPU time between CUDA events (triton's do_bench: calls queued
back to back, L2 flushed between them; the host prepares the next call while the GPU runs, so host
cost up to the flush's GPU time never shows); "wall", host and device together per call over a loop
of back-to-back calls, synchronised at its ends (host-bound cases: a small layer's per-call cost);
"latency", each call synchronised (what one call adds, host checks included, when its GPU work
cannot hide them: an API's overhead over its kernel)."""


def _wall_bench(fn, sync, per_call: bool, rounds: int = 25, calls: int = 40) -> list[float]:
    """ms per call: median / p20 / p80 over ``rounds`` rounds of ``calls`` calls (after a warm-up round)."""
    times = []
    for r in range(rounds + 1):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
            if per_call:
                sync()
        sync()
        if r:
            times.append((time.perf_counter() - start) * 1e3 / calls)
    return _quantiles(times)


def time_us(fn, dry_run: bool, timer: str = "gpu") -> dict:
    """median / p20 / p80 in microseconds, by ``timer`` (:data:`TIMERS`; a dry run times the host only)."""
    if timer not in TIMERS:
        raise ValueError(f"timer must be one of {TIMERS}, got {timer!r}")
    if dry_run:
        ms = _cpu_bench(fn)
    elif timer == "gpu":
        import triton.testing

        ms = triton.testing.do_bench(fn, quantiles=list(QUANTILES))
    else:
        ms = _wall_bench(fn, torch.cuda.synchronize, per_call=timer == "latency")
    return {"median_us": ms[0] * 1e3, "p20_us": ms[1] * 1e3, "p80_us": ms[2] * 1e3}


def run_case(case: dict, dry_run: bool, timeout_s: float = CASE_TIMEOUT_S) -> dict:
    """Check, time, compare: one result record (errors and timeouts are recorded, never raised).

    A case is timed (``fn``) or probed (``probe``: returns a dict merged into the record, e.g.
    whether a CUDA graph captured). ``target_speedup`` ({baseline: minimum speed-up}) and
    ``target_us`` give ``meets_target``; ``overhead_vs`` names a baseline whose median is
    subtracted from the case's (``overhead_us``, with ``target_overhead_us``).
    """
    record = {k: case[k] for k in ("name", "module", "backend", "target_us", "target_speedup", "target_overhead_us",
                                   "bytes", "flops", "numel", "tensors") if case.get(k) is not None}
    timer = case.get("timer", "gpu")  # the case and its baselines alike
    if "skip" in case:
        return dict(record, skipped=case["skip"])
    try:
        with time_limit(timeout_s):
            if "probe" in case:
                return dict(record, **case["probe"]())
            if "check" in case:
                case["check"]()
                record["checked"] = True
            record["timer"] = timer
            record.update(time_us(case["fn"], dry_run, timer))
    except Exception as exc:  # noqa: BLE001 - report and go on with the next case
        return dict(record, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=3))
    seconds = record["median_us"] * 1e-6
    if case.get("bytes"):
        record["gbps"] = case["bytes"] / seconds / 1e9
    if case.get("flops"):
        record["tflops"] = case["flops"] / seconds / 1e12
    record["baselines"], record["speedup"] = {}, {}
    for name, fn in case.get("baselines", {}).items():
        try:
            with time_limit(timeout_s):
                record["baselines"][name] = time_us(fn, dry_run, timer)
            record["speedup"][name] = record["baselines"][name]["median_us"] / record["median_us"]
        except Exception as exc:  # noqa: BLE001 - e.g. a baseline running out of memory or time
            record["baselines"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    if case.get("overhead_vs") in record["speedup"]:
        record["overhead_us"] = record["median_us"] - record["baselines"][case["overhead_vs"]]["median_us"]
    if not dry_run:
        met = []
        if case.get("target_us") is not None:
            met.append(record["median_us"] <= case["target_us"])
        for name, minimum in (case.get("target_speedup") or {}).items():
            met.append(record["speedup"].get(name, 0.0) >= minimum)
        if case.get("target_overhead_us") is not None:
            met.append(record.get("overhead_us", float("inf")) <= case["target_overhead_us"])
        if met:
            record["meets_target"] = all(met)
    return record


def _driver_version() -> Optional[str]:
    """The NVIDIA driver's version (``torch.version.cuda`` is the toolkit torch was built with)."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def environment(dry_run: bool) -> dict:
    """Hardware, versions, commit and the numerics flags that change timings."""
    import triton

    from bise_kernels.info import ENVIRONMENT, source_commit

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        **source_commit(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "environment": {name: os.environ.get(name) for name in ENVIRONMENT},  # e.g. BISE_SELECT_CUDA, AUTOTUNE
    }
    if dry_run:
        env.update(gpu="cpu-dry-run", cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    else:
        props = torch.cuda.get_device_properties(0)
        env.update(driver=_driver_version(), gpu=props.name, capability=f"{props.major}.{props.minor}",
                   sms=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return env


def result_path(out_dir: Path, env: dict, name_filter: str = "") -> Path:
    """<gpu>-<yyyymmdd>-<commit>[-<filter>].json: a filtered run does not overwrite a whole one."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-").lower()
    day = env["date"][:10].replace("-", "")
    tag = re.sub(r"[^A-Za-z0-9]+", "-", name_filter).strip("-").lower()
    return out_dir / f"{gpu}-{day}-{env['commit'][:8]}{'-' + tag if tag else ''}.json"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU cases with a CPU timer: checks the wiring")
    parser.add_argument("--out", type=Path, help="folder for the JSON (default benchmarks/results, or a temp dir "
                                                 "for --dry-run)")
    parser.add_argument("--filter", default="", help="only cases whose name contains this text")
    parser.add_argument("--case-timeout-s", type=float, default=CASE_TIMEOUT_S, help="time limit of one case")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="wall time of the whole run; cases not started by then are recorded as skipped")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or use --dry-run to check the wiring")
    start = time.monotonic()
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="gpu_suite_")) if args.dry_run else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(args.dry_run)
    path = result_path(out_dir, env, args.filter)
    cases, notes = load_cases(args.dry_run, args.filter)
    results: list[dict] = []
    for case in cases:
        if time.monotonic() - start > args.budget_s:
            results.append({"name": case["name"], "skipped": f"suite budget of {args.budget_s:.0f} s spent"})
        else:
            results.append(run_case(case, args.dry_run, args.case_timeout_s))
        print(_summary(results[-1]), flush=True)
        _write(path, {**env, "notes": notes, "cases": results})
    _write(path, {**env, "notes": notes, "cases": results, "wall_s": round(time.monotonic() - start, 1)})
    for note in notes:
        print(f"note: {note['module']}: {note['note']}")
    print(f"wrote {path}")
    return path


def _write(path: Path, run: dict) -> None:
    """Replace the result file in one step (a reader never sees half a file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    os.replace(tmp, path)


def _summary(r: dict) -> str:
    if "skipped" in r or "error" in r:
        return f"{r['name']}: {r.get('skipped') or r.get('error')}"
    if "median_us" not in r:  # a probe
        return f"{r['name']}: {json.dumps({k: v for k, v in r.items() if k not in ('name', 'module')})}"
    speedups = ", ".join(f"{k} x{v:.1f}" for k, v in r["speedup"].items())
    return f"{r['name']}: {r['median_us']:.1f} us (p20 {r['p20_us']:.1f}, p80 {r['p80_us']:.1f}); {speedups}"


if __name__ == "__main__":
    main()
