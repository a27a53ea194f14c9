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
``--summarize-tests LOG [JUNIT...]`` prints the JSON summary of the GPU tests that benchmarks/run_gpu.sh
ran (``pytest -v`` log and JUnit XML files), which ``--gpu-tests FILE`` stores in the suite's JSON.
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
CASE_MODULES = ("bench_select_gpu", "bench_step_gpu", "bench_masked_gpu", "bench_workflow_gpu")
"""In the order a cut run keeps them (:func:`in_budget_order`)."""
MODULE_PREFIXES = {"bench_select_gpu": ("select_",), "bench_masked_gpu": ("masked_", "channel_gate_"),
                   "bench_step_gpu": ("step_", "overhead_", "cuda_graph_"), "bench_workflow_gpu": ("workflow_",)}
"""How every case name of each module begins (tests/benchmarks/test_gpu_suite.py checks it): an anchored
filter (``^workflow_``) builds only the modules whose cases it can match (building allocates GPU memory)."""
QUANTILES = (0.5, 0.2, 0.8)
CASE_TIMEOUT_S = 90.0
BUDGET_S = 480.0


class CaseTimeout(Exception):
    """A case ran past its time limit (raised in the main thread by SIGALRM)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise CaseTimeout after ``seconds`` of wall time (between Python statements); at once where no time
    is left (``seconds <= 0``: setitimer would take 0 as "no limit")."""
    if seconds <= 0:
        raise CaseTimeout("no time left before the suite's deadline")

    def expire(signum, frame):
        raise CaseTimeout(f"ran past {seconds:.3g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def name_matches(name: str, name_filter: str) -> bool:
    """``name_filter`` in ``name``; a filter that begins with ``^`` matches the names that begin with the rest."""
    if name_filter.startswith("^"):
        return name.startswith(name_filter[1:])
    return name_filter in name


def _may_match(module: str, name_filter: str) -> bool:
    """Whether a case of ``module`` can match ``name_filter`` (only an anchored filter rules a module out)."""
    if not name_filter.startswith("^") or module not in MODULE_PREFIXES:
        return True
    text = name_filter[1:]
    return any(text.startswith(p) or p.startswith(text) for p in MODULE_PREFIXES[module])


def load_cases(dry_run: bool, name_filter: str = "") -> tuple[list[dict], list[dict]]:
    """Cases (whose name matches ``name_filter``: :func:`name_matches`) from every module that imports,
    and a note for each module or build that failed. A module none of whose cases an anchored filter
    can match is not imported (its cases would allocate GPU memory for nothing)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    cases, notes = [], []
    for name in CASE_MODULES:
        if not _may_match(name, name_filter):
            continue
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
        cases += [dict(case, module=name) for case in found if name_matches(case["name"], name_filter)]
    return in_budget_order(cases), notes


def in_budget_order(cases: list[dict]) -> list[dict]:
    """The budget cuts a run from the end, so: first the default paths and the API, the selection,
    then the training steps, the per-call overhead and the CUDA-graph probe (cheap, and telling),
    then the ~50 masked-op cases (whose max-autotune baselines compile for minutes); then the
    Triton backend's cases, which no "auto" order takes on CUDA (docs/gpu_suite.md) and the dearest
    (every new shape compiles, and autotunes up to four tiles); last the workflow cases, which the
    device's workflow call runs first anyway (scripts/gpu_workflow.sh). Within each group the
    modules in CASE_MODULES's order, each module's cases in its own order."""
    rank = {module: i for i, module in enumerate(CASE_MODULES)}
    return sorted(cases, key=lambda case: (case.get("module") == "bench_workflow_gpu", case.get("backend") == "triton",
                                           rank.get(case.get("module"), len(rank))))


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


def _left(timeout_s: float, deadline: Optional[float]) -> float:
    """The limit of one timed step: the case limit, cut to what is left before ``deadline`` (time.monotonic)."""
    return timeout_s if deadline is None else min(timeout_s, deadline - time.monotonic())


def run_case(case: dict, dry_run: bool, timeout_s: float = CASE_TIMEOUT_S,
             baseline_cache: Optional[dict] = None, deadline: Optional[float] = None) -> dict:
    """Check, time, compare: one result record (errors and timeouts are recorded, never raised).

    A case is timed (``fn``) or probed (``probe``: returns a dict merged into the record, e.g.
    whether a CUDA graph captured). ``target_speedup`` ({baseline: minimum speed-up}) and
    ``target_us`` give ``meets_target``: True, False (a target missed), or None when no target
    was missed but one could not be checked because its baseline failed (``targets_unchecked``
    names them). ``overhead_vs`` names a baseline whose median is subtracted from the case's
    (``overhead_us``, with ``target_overhead_us``). ``baseline_cache``: a dict kept across cases, so
    that a baseline callable shared by several cases (one input, one baseline per backend's case) is
    timed once (its record then says ``shared_with``: the case that timed it). ``deadline``: the
    time.monotonic() past which nothing more runs: the check with the timing and each baseline get the case
    limit, cut to what is left (a case with four baselines ran up to five limits past the suite's budget).
    """
    record = {k: case[k] for k in ("name", "module", "backend", "target_us", "target_speedup", "target_overhead_us",
                                   "bytes", "flops", "numel", "tensors") if case.get(k) is not None}
    timer = case.get("timer", "gpu")  # the case and its baselines alike
    if "skip" in case:
        return dict(record, skipped=case["skip"])
    try:
        with time_limit(_left(timeout_s, deadline)):
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
        key = (fn, timer)
        if baseline_cache is not None and key in baseline_cache:
            first, timing = baseline_cache[key]
            record["baselines"][name] = dict(timing, shared_with=first)
        else:
            try:
                with time_limit(_left(timeout_s, deadline)):
                    timing = time_us(fn, dry_run, timer)
            except Exception as exc:  # noqa: BLE001 - e.g. a baseline running out of memory or time
                timing = {"error": f"{type(exc).__name__}: {exc}"}
            record["baselines"][name] = timing
            if baseline_cache is not None:
                baseline_cache[key] = (case["name"], timing)
        if "median_us" in record["baselines"][name]:
            record["speedup"][name] = record["baselines"][name]["median_us"] / record["median_us"]
    if case.get("overhead_vs") in record["speedup"]:
        record["overhead_us"] = record["median_us"] - record["baselines"][case["overhead_vs"]]["median_us"]
    if not dry_run:
        met, unchecked = [], []  # a target whose baseline failed is neither met nor missed
        if case.get("target_us") is not None:
            met.append(record["median_us"] <= case["target_us"])
        for name, minimum in (case.get("target_speedup") or {}).items():
            if name in record["speedup"]:
                met.append(record["speedup"][name] >= minimum)
            else:
                unchecked.append(name)
        if case.get("target_overhead_us") is not None:
            if "overhead_us" in record:
                met.append(record["overhead_us"] <= case["target_overhead_us"])
            else:
                unchecked.append(case.get("overhead_vs") or "overhead_vs")
        if met or unchecked:
            record["meets_target"] = False if not all(met) else (None if unchecked else True)
        if unchecked:
            record["targets_unchecked"] = unchecked
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


_OUTCOME = re.compile(r"^(\S+\.py::\S.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_SHORT = re.compile(r"^(FAILED|ERROR) (\S+\.py::\S.*?)(?: - (.*))?$")
_STARTED = re.compile(r"^(\S+\.py::\S\S*)")


def _junit_id(classname: str, name: str) -> str:
    """The pytest node id of a JUnit test case: classname ``tests.kernels.test_x[.TestC]`` names the file."""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        if (ROOT / ("/".join(parts[:cut]) + ".py")).is_file():
            return "::".join(["/".join(parts[:cut]) + ".py", *parts[cut:], name])
    return f"{classname}::{name}"


def summarize_gpu_tests(log_text: str, junit_paths=()) -> dict:
    """What the GPU tests did, from run_gpu.sh's ``pytest -v -rA`` log (a line per test as it ends, so a
    run cut by its time limit still tells) and the JUnit XML files of the pytest runs that ended (each
    test's seconds): ``counts`` per outcome, ``not_passed`` {test: {outcome, message}}, ``cut`` (the
    test running when the time limit stopped pytest, else None), ``not_run`` (-k selections the time
    did not reach), ``slowest`` (the 20 longest tests, seconds) and ``seconds`` (all tests)."""
    import xml.etree.ElementTree as ElementTree

    tests: dict[str, dict] = {}
    running, not_run = None, []
    for line in log_text.splitlines():
        if line.startswith("no time left for -k "):
            not_run.append(line.split("-k ", 1)[1].strip("'"))
        elif m := _OUTCOME.match(line):
            tests.setdefault(m.group(1), {})["outcome"] = m.group(2).lower()
            running = None
        elif m := _SHORT.match(line):
            entry = tests.setdefault(m.group(2), {"outcome": m.group(1).lower()})
            if m.group(3):
                entry["message"] = m.group(3)[:300]
        elif m := _STARTED.match(line):
            running = m.group(1)
        elif line.startswith(("== -k ", "=")):
            running = None
    for path in junit_paths:
        path = Path(path)
        if not path.is_file():
            continue
        for case in ElementTree.parse(path).getroot().iter("testcase"):
            entry = tests.setdefault(_junit_id(case.get("classname", ""), case.get("name", "")), {})
            entry["seconds"] = round(float(case.get("time") or 0.0), 3)
            for tag in ("failure", "error", "skipped"):
                found = case.find(tag)
                if found is not None:
                    entry.setdefault("outcome", {"failure": "failed", "error": "error", "skipped": "skipped"}[tag])
                    entry.setdefault("message", (found.get("message") or "")[:300])
                    break
            else:
                entry.setdefault("outcome", "passed")
    counts: dict[str, int] = {}
    for entry in tests.values():
        counts[entry.get("outcome", "?")] = counts.get(entry.get("outcome", "?"), 0) + 1
    if running is not None:
        counts["cut"] = 1
    timed = sorted(((t, e["seconds"]) for t, e in tests.items() if "seconds" in e), key=lambda te: -te[1])
    return {"counts": counts, "cut": running, "not_run": not_run,
            "not_passed": {t: e for t, e in tests.items() if e.get("outcome") not in ("passed", "skipped", "xfail")},
            "slowest": [{"test": t, "seconds": s} for t, s in timed[:20]],
            "seconds": round(sum(s for _, s in timed), 1)}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU cases with a CPU timer: checks the wiring")
    parser.add_argument("--out", type=Path, help="folder for the JSON (default benchmarks/results, or a temp dir "
                                                 "for --dry-run)")
    parser.add_argument("--filter", default="", help="only cases whose name contains this text (^TEXT: begins with "
                                                      "it; then only the modules that can match are built)")
    parser.add_argument("--case-timeout-s", type=float, default=CASE_TIMEOUT_S, help="time limit of one case")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S,
                        help="wall time of the whole run; cases not started by then are recorded as skipped")
    parser.add_argument("--gpu-tests", type=Path, help="the GPU tests' summary (--summarize-tests), kept in the JSON")
    parser.add_argument("--summarize-tests", nargs="+", type=Path, metavar="LOG [JUNIT]",
                        help="print the summary of the GPU tests from run_gpu.sh's pytest -v log and JUnit XML files")
    args = parser.parse_args(argv)
    if args.summarize_tests:
        log_path, *junit = args.summarize_tests
        print(json.dumps(summarize_gpu_tests(log_path.read_text(errors="replace") if log_path.is_file() else "", junit),
                         indent=1))
        return log_path
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or use --dry-run to check the wiring")
    start = time.monotonic()
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="gpu_suite_")) if args.dry_run else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(args.dry_run)
    if args.gpu_tests is not None:
        try:
            env["gpu_tests"] = json.loads(args.gpu_tests.read_text())
        except (OSError, ValueError) as exc:
            env["gpu_tests"] = {"error": f"{type(exc).__name__}: {exc}"}
    path = result_path(out_dir, env, args.filter)
    cases, notes = load_cases(args.dry_run, args.filter)
    results: list[dict] = []
    shared: dict = {}  # baselines timed once per input (run_case's baseline_cache)
    # a case started within the budget may run one case limit past it, no more (run_gpu.sh's margin)
    deadline = start + args.budget_s + args.case_timeout_s
    for case in cases:
        if time.monotonic() - start > args.budget_s:
            results.append({"name": case["name"], "skipped": f"suite budget of {args.budget_s:.0f} s spent"})
        else:
            began = time.monotonic()
            results.append(run_case(case, args.dry_run, args.case_timeout_s, shared, deadline=deadline))
            results[-1]["elapsed_s"] = round(time.monotonic() - began, 2)
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
    if "skipped" in r:
        return f"{r['name']}: {r['skipped']}"
    if "median_us" not in r and "traceback" not in r:  # a probe: its outcome, an error it recorded included
        return f"{r['name']}: {json.dumps({k: v for k, v in r.items() if k not in ('name', 'module')})}"
    if "error" in r:
        return f"{r['name']}: {r['error']}"
    speedups = ", ".join(f"{k} x{v:.1f}" for k, v in r["speedup"].items())
    return f"{r['name']}: {r['median_us']:.1f} us (p20 {r['p20_us']:.1f}, p80 {r['p80_us']:.1f}); {speedups}"


if __name__ == "__main__":
    main()
