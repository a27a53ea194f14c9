"""Markdown tables of the benchmark results: ``python benchmarks/render_results.py [FILES...]``.

Reads benchmarks/results/*.json (or the given files), newest first:
* GPU suite files (``gpu_suite.py``): one row per case: GPU, commit, case, median and p20-p80 in
  us, GB/s, target, and the speed-up over each baseline;
* pytest-benchmark files (``pytest benchmarks --benchmark-only --benchmark-json=...``): one row per
  benchmark: machine, commit, name, median in ms and the figures it records in ``extra_info``
  (ratios measured side by side in the same run);
* scaling files (``scaling.py``): one row per process count of an extraction epoch.
The README's performance tables are this output. With no result files it prints a note. Dry runs
(``dry_run: true``: the suite's ``--dry-run`` on the CPU, whose numbers mean nothing) are left out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HEADER = ("| GPU | commit | case | median us (p20-p80) | GB/s | target | speed-up vs baselines |\n"
          "|---|---|---|---|---|---|---|")
NO_RESULTS = ("_No GPU results yet: run `python benchmarks/gpu_suite.py` on a GPU machine and commit "
              "benchmarks/results/*.json._")


def _cell(text, limit: int) -> str:
    """``text`` fit for one table cell: no line breaks, no column separators, at most ``limit`` characters."""
    return " ".join(str(text).replace("|", "/").split())[:limit]


def _target(case: dict) -> str:
    """The case's targets (time, ratios, overhead) and whether the run met them all (unknown when a
    baseline a target compares with failed, and no other target was missed)."""
    parts = []
    if case.get("target_us") is not None:
        parts.append(f"<= {case['target_us']:.0f} us")
    parts += [f"{name} >= {value:.2f}x" for name, value in (case.get("target_speedup") or {}).items()]
    if case.get("target_overhead_us") is not None:
        parts.append(f"overhead <= {case['target_overhead_us']:.0f} us")
    if parts and "meets_target" in case:
        if case["meets_target"] is None:
            parts.append(f"unknown (baseline failed: {', '.join(case.get('targets_unchecked', []))})")
        else:
            parts.append("met" if case["meets_target"] else "missed")
    return _cell(", ".join(parts), 200)


PROBE_SKIP = ("name", "module", "backend", "elapsed_s")
"""Keys of a probe's record that are not its outcome."""


def _baselines(case: dict) -> str:
    """The speed-up over each baseline; a baseline that failed, with its error."""
    parts = [f"{name} {value:.2f}x" for name, value in case.get("speedup", {}).items()]
    parts += [f"{name} error: {_cell(b['error'], 80)}" for name, b in case.get("baselines", {}).items()
              if isinstance(b, dict) and "error" in b]
    return _cell(", ".join(parts), 400)


def _row(run: dict, case: dict) -> str:
    dirty = "+dirty" if run.get("dirty") else ""  # measured on uncommitted changes: the commit alone is not the code
    head = f"| {run.get('gpu', '?')} | {str(run.get('commit', '?'))[:8]}{dirty} | {case['name']} |"
    if "skipped" in case:
        return f"{head} {_cell(case['skipped'], 120)} | | | |"
    if "median_us" not in case and "traceback" not in case:  # a probe: its outcome, an error it recorded too
        outcome = ", ".join(f"{k} {v}" for k, v in case.items() if k not in PROBE_SKIP)
        return f"{head} {_cell(outcome, 200)} | | | |"
    if "error" in case:
        return f"{head} {_cell('error: ' + str(case['error']), 160)} | | | |"
    timing = f"{case['median_us']:.1f} ({case['p20_us']:.1f}-{case['p80_us']:.1f})"
    if "overhead_us" in case:
        timing += f"; overhead {case['overhead_us']:.1f}"
    gbps = f"{case['gbps']:.0f}" if "gbps" in case else ""
    return f"{head} {timing} | {gbps} | {_target(case)} | {_baselines(case)} |"


CPU_HEADER = ("| machine | commit | group | benchmark | median ms | recorded figures |\n"
              "|---|---|---|---|---|---|")


def _figure(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _cpu_rows(run: dict) -> list[str]:
    machine = run.get("machine_info", {})
    cpu = machine.get("cpu", {})
    where = f"{cpu.get('brand_raw', machine.get('processor', '?'))}, {cpu.get('count', '?')} cores"
    info = run.get("commit_info", {})
    commit = str(info.get("id", "?"))[:8] + ("+dirty" if info.get("dirty") else "")
    rows = []
    for bench in run.get("benchmarks", []):
        if "triton" in bench["name"]:  # the Triton interpreter on a CPU (TRITON_INTERPRET): its times say nothing
            continue
        extra = ", ".join(f"{k} {_figure(v)}" for k, v in bench.get("extra_info", {}).items()
                          if isinstance(v, (int, float, str)))
        rows.append(f"| {where} | {commit} | {bench.get('group') or ''} | {bench['name']} | "
                    f"{1e3 * bench['stats']['median']:.3f} | {extra} |")
    return rows


SCALING_HEADER = ("| device | commit | workload | processes | epoch s | speed-up | efficiency | all-reduce B/step/rank "
                  "| all-gather B/step/rank |\n|---|---|---|---|---|---|---|---|---|")


def _scaling_rows(run: dict) -> list[str]:
    c = run["config"]
    workload = f"{c['data']} {c['arch']} x{c['width']}, batch {c['batch_size']}, {c['train_samples']} images"
    return [f"| {run['device']} | {run['commit']} | {workload} | {r['processes']} | {r['epoch_seconds']:.3f} | "
            f"{r['speedup']:.2f} | {r['efficiency']:.2f} | {r['bytes_per_step_per_rank']['all_reduce_bytes']:.0f} | "
            f"{r['bytes_per_step_per_rank']['all_gather_bytes']:.0f} |" for r in run["rows"]]


def render(runs: list[dict]) -> str:
    """Markdown for the given result files (parsed JSON); a note when there are none."""
    runs = [r for r in runs if not r.get("dry_run")]  # a CPU dry run's numbers mean nothing
    gpu = sorted((r for r in runs if "cases" in r), key=lambda r: r.get("date", ""), reverse=True)
    cpu = sorted((r for r in runs if "benchmarks" in r), key=lambda r: r.get("datetime", ""), reverse=True)
    parts = ["\n".join([HEADER] + [_row(run, case) for run in gpu for case in run["cases"]]) if gpu else NO_RESULTS]
    if cpu:
        parts.append("\n".join([CPU_HEADER] + [row for run in cpu for row in _cpu_rows(run)]))
    scaling = [r for r in runs if r.get("benchmark") == "extraction epoch scaling"]
    if scaling:
        parts.append("\n".join([SCALING_HEADER] + [row for run in scaling for row in _scaling_rows(run)]))
    return "\n\n".join(parts)


def load(paths: list[Path]) -> list[dict]:
    return [json.loads(p.read_text()) for p in paths]


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="result files (default: benchmarks/results/*.json)")
    args = parser.parse_args(argv)
    paths = args.files or sorted(RESULTS.glob("*.json"))
    text = render(load(paths))
    print(text)
    return text


if __name__ == "__main__":
    main()
