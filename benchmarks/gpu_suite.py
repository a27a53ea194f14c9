"""The GPU benchmark suite in one command: ``python benchmarks/gpu_suite.py``.

Collects the cases of every module in CASE_MODULES (format: docs/gpu_suite.md), checks each
case's result where it can, times the case and each of its baselines side by side with
triton.testing.do_bench (median, p20, p80; L2 flushed between runs) and writes
``benchmarks/results/<gpu>-<yyyymmdd>-<commit>.json`` with the GPU, torch/triton/CUDA versions,
the commit, and per case the timings, achieved GB/s (and TFLOP/s), the target and the speed-up
over each baseline. ``--dry-run`` checks the wiring on the CPU with tiny cases and a
perf_counter timer (its JSON goes to a temporary folder unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CASE_MODULES = ("bench_select_gpu", "bench_masked_gpu", "bench_workflow_gpu")
QUANTILES = (0.5, 0.2, 0.8)


def load_cases(dry_run: bool) -> tuple[list[dict], list[dict]]:
    """Cases from every module that imports, and a note for each module or build that failed."""
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
        cases += [dict(case, module=name) for case in found]
    return cases, notes


def _cpu_bench(fn, reps: int = 5) -> list[float]:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return [statistics.median(times), times[max(0, round(0.2 * (reps - 1)))], times[round(0.8 * (reps - 1))]]


def time_us(fn, dry_run: bool) -> dict:
    """median / p20 / p80 in microseconds."""
    if dry_run:
        ms = _cpu_bench(fn)
    else:
        import triton.testing

        ms = triton.testing.do_bench(fn, quantiles=list(QUANTILES))
    return {"median_us": ms[0] * 1e3, "p20_us": ms[1] * 1e3, "p80_us": ms[2] * 1e3}


def run_case(case: dict, dry_run: bool) -> dict:
    """Check, time, compare: one result record (errors are recorded, never raised)."""
    record = {k: case[k] for k in ("name", "module", "backend", "target_us", "bytes", "flops", "numel", "tensors")
              if case.get(k) is not None}
    if "skip" in case:
        return dict(record, skipped=case["skip"])
    try:
        if "check" in case:
            case["check"]()
            record["checked"] = True
        record.update(time_us(case["fn"], dry_run))
    except Exception as exc:  # noqa: BLE001 - report and go on with the next case
        return dict(record, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=3))
    seconds = record["median_us"] * 1e-6
    if case.get("bytes"):
        record["gbps"] = case["bytes"] / seconds / 1e9
    if case.get("flops"):
        record["tflops"] = case["flops"] / seconds / 1e12
    if case.get("target_us") is not None and not dry_run:
        record["meets_target"] = record["median_us"] <= case["target_us"]
    record["baselines"], record["speedup"] = {}, {}
    for name, fn in case.get("baselines", {}).items():
        try:
            record["baselines"][name] = time_us(fn, dry_run)
            record["speedup"][name] = record["baselines"][name]["median_us"] / record["median_us"]
        except Exception as exc:  # noqa: BLE001 - e.g. a baseline running out of memory
            record["baselines"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    return record


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def environment(dry_run: bool) -> dict:
    """Hardware, versions, commit and the numerics flags that change timings."""
    import triton

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dry_run": dry_run,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": os.environ.get("BISE_COMMIT") or _git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    if dry_run:
        env.update(gpu="cpu-dry-run", cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    else:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return env


def result_path(out_dir: Path, env: dict) -> Path:
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env["gpu"]).strip("-").lower()
    day = env["date"][:10].replace("-", "")
    return out_dir / f"{gpu}-{day}-{env['commit'][:8]}.json"


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU cases with a CPU timer: checks the wiring")
    parser.add_argument("--out", type=Path, help="folder for the JSON (default benchmarks/results, or a temp dir "
                                                 "for --dry-run)")
    parser.add_argument("--filter", default="", help="only cases whose name contains this text")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or use --dry-run to check the wiring")
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="gpu_suite_")) if args.dry_run else RESULTS)
    env = environment(args.dry_run)
    cases, notes = load_cases(args.dry_run)
    results = []
    for case in cases:
        if args.filter in case["name"]:
            results.append(run_case(case, args.dry_run))
            print(_summary(results[-1]), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = result_path(out_dir, env)
    path.write_text(json.dumps({**env, "notes": notes, "cases": results}, indent=1) + "\n")
    for note in notes:
        print(f"note: {note['module']}: {note['note']}")
    print(f"wrote {path}")
    return path


def _summary(r: dict) -> str:
    if "skipped" in r or "error" in r:
        return f"{r['name']}: {r.get('skipped') or r.get('error')}"
    speedups = ", ".join(f"{k} x{v:.1f}" for k, v in r["speedup"].items())
    return f"{r['name']}: {r['median_us']:.1f} us (p20 {r['p20_us']:.1f}, p80 {r['p80_us']:.1f}); {speedups}"


if __name__ == "__main__":
    main()
