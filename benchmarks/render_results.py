"""Markdown table of the GPU suite's results: ``python benchmarks/render_results.py [FILES...]``.

Reads benchmarks/results/*.json (or the given files), newest first, and prints one row per case:
GPU, commit, case, median and p20-p80 in us, GB/s, target, and the speed-up over each baseline.
The README's performance table is this output. With no result files it prints a note.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HEADER = ("| GPU | commit | case | median us (p20-p80) | GB/s | target us | speed-up vs baselines |\n"
          "|---|---|---|---|---|---|---|")
NO_RESULTS = ("_No GPU results yet: run `python benchmarks/gpu_suite.py` on a GPU machine and commit "
              "benchmarks/results/*.json._")


def _row(run: dict, case: dict) -> str:
    head = f"| {run.get('gpu', '?')} | {str(run.get('commit', '?'))[:8]} | {case['name']} |"
    if "skipped" in case or "error" in case:
        why = case.get("skipped") or f"error: {case['error']}"
        return f"{head} {why.replace('|', '/')[:120]} | | | |"
    timing = f"{case['median_us']:.1f} ({case['p20_us']:.1f}-{case['p80_us']:.1f})"
    gbps = f"{case['gbps']:.0f}" if "gbps" in case else ""
    target = ""
    if case.get("target_us") is not None:
        target = f"{case['target_us']:.0f} {'met' if case.get('meets_target') else 'missed'}"
    speedups = ", ".join(f"{name} {value:.1f}x" for name, value in case.get("speedup", {}).items())
    return f"{head} {timing} | {gbps} | {target} | {speedups} |"


def render(runs: list[dict]) -> str:
    """Markdown for the given suite outputs (parsed JSON); a note when there are none."""
    if not runs:
        return NO_RESULTS
    runs = sorted(runs, key=lambda r: r.get("date", ""), reverse=True)
    return "\n".join([HEADER] + [_row(run, case) for run in runs for case in run.get("cases", [])])


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
