"""Regenerate the published BISE results (docs/results.md and benchmarks/results/bise-*.json).

    python scripts/bise_results.py --suite main [--scale cpu|paper] [--device cpu] [--seeds 0 1 2]

Suites (issue #7 section 6):
* main: the scale's data and model at rho 0.99 / 0.995 / 0.997, several seeds:
  vanilla vs BISE vs BISE+FT unbiased test accuracy, weights removed, MMACs;
* ablation: rho 0.99 with reweighting only / MI only / both / neither;
* fashion: the Fashion-MNIST benchmarks (colored, background, corrupted, textured).
Every configuration is one `bise run` in runs/results/<suite>/<name>/ (resumable: a finished run
is reused), so an interrupted regeneration continues where it stopped. The scale (images,
width, epochs) and the device are written next to every figure: "cpu" fits this project's
2-core CPU machines (colored-mnist + mlp, paper schedule); "paper" is the paper's setting
(biased-mnist + simple-cnn, paper schedule; a GPU machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "results"
DOC = ROOT / "docs" / "results.md"
RESULTS = ROOT / "benchmarks" / "results"

SCALES = {
    # what 2 CPU cores manage in minutes per run: the paper's extraction schedule on the cheap 3x100 MLP
    # and LfF-style colored MNIST (a vanilla MLP on background-coloured biased-mnist learns colour only)
    "cpu": {"data": "colored-mnist", "arch": "mlp", "n_train": None, "width": 1.0, "vanilla_epochs": None,
            "mask_epochs": 100, "head_epochs": 50, "finetune_epochs": 10},
    # the paper's setting: biased-mnist, simple-cnn, full schedule (a GPU machine)
    "paper": {"data": "biased-mnist", "arch": "simple-cnn", "n_train": None, "width": 1.0, "vanilla_epochs": None,
              "mask_epochs": 100, "head_epochs": 50, "finetune_epochs": 10},
}
ABLATION = {"reweight+MI": [], "reweight only": ["--no-mi"], "MI only": ["--no-reweight"],
            "neither": ["--no-mi", "--no-reweight"]}
FASHION = ("fashion-colored:rho=0.99", "fashion-background:rho=0.99", "fashion-corrupted:rho=0.99",
           "fashion-textured")


def _spec(base: str, scale: dict) -> str:
    if scale["n_train"] is None:
        return base
    return f"{base}{',' if ':' in base else ':'}n_train={scale['n_train']}"


def configurations(suite: str, seeds: list[int], scale: dict) -> list[dict]:
    runs = []
    data, arch = scale["data"], scale["arch"]
    if suite == "main":
        for rho in (0.99, 0.995, 0.997):
            for seed in seeds:
                runs.append({"name": f"rho{rho}-seed{seed}", "data": _spec(f"{data}:rho={rho}", scale),
                             "arch": arch, "seed": seed, "group": f"{data} rho={rho}", "extra": []})
    elif suite == "ablation":
        for label, flags in ABLATION.items():
            for seed in seeds:
                runs.append({"name": f"{label.replace(' ', '_').replace('+', '_')}-seed{seed}",
                             "data": _spec(f"{data}:rho=0.99", scale), "arch": arch, "seed": seed,
                             "group": label, "extra": flags})
    elif suite == "fashion":
        for spec in FASHION:
            for seed in seeds:
                runs.append({"name": f"{spec.split(':')[0]}-seed{seed}", "data": _spec(spec, scale),
                             "arch": arch, "seed": seed, "group": spec, "extra": []})
    else:
        raise SystemExit(f"--suite must be main, ablation or fashion, got {suite!r}")
    return runs


def run_one(cfg: dict, scale: dict, out: Path, device: str) -> dict:
    """One `bise run` (reused when its report exists); returns its report.json."""
    report = out / "report.json"
    if not report.is_file():
        from bise.cli import main

        argv = ["run", "--data", cfg["data"], "--arch", cfg["arch"], "--out", str(out), "--seed", str(cfg["seed"]),
                "--width", str(scale["width"]), "--mask-epochs", str(scale["mask_epochs"]),
                "--head-epochs", str(scale["head_epochs"]), "--finetune-epochs", str(scale["finetune_epochs"]),
                "--device", device, "--latency-repeats", "0", "--quiet", *cfg["extra"]]
        if scale["vanilla_epochs"] is not None:
            argv += ["--vanilla-epochs", str(scale["vanilla_epochs"])]
        if out.exists():
            argv.append("--resume")
        status = main(argv)
        if status != 0:
            raise SystemExit(f"bise run failed for {cfg['name']} (exit {status})")
    return json.loads(report.read_text())


def _row(report: dict) -> dict:
    def unbiased(section):
        return report[section]["test"]["unbiased_accuracy"] if section in report else None

    return {"vanilla": unbiased("vanilla"), "bise": unbiased("subnetwork"), "bise_ft": unbiased("finetuned"),
            "worst_group_bise": report["subnetwork"]["test"]["worst_group_accuracy"],
            "weights_removed": report["subnetwork"]["weights_removed"],
            "units_pruned": report["subnetwork"]["units_pruned"],
            "mflops_vanilla": report["vanilla"]["mmacs"], "mflops_bise": report["subnetwork"]["mmacs"],
            "max_abs_diff": report["export"]["max_abs_diff"],
            "extraction_seconds": report["timing"].get("extraction_seconds")}


def _mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def _plain_mean(values: list, fmt: str) -> str:
    values = [v for v in values if v is not None]
    return format(statistics.mean(values), fmt) if values else "-"


def render(results: dict) -> str:
    lines = ["# BISE results", "",
             "Generated by `python scripts/bise_results.py`; do not edit by hand. Accuracies are unbiased test "
             "accuracy (mean of per-(y, b)-group accuracies, %), mean ± std over seeds. These are results on "
             "this project's offline data (real MNIST / Fashion-MNIST digits coloured by `bise.data`), at the "
             "scale stated per suite: compare trends with the paper, not absolute numbers.", ""]
    for suite, entry in results.items():
        scale, meta = entry["scale"], entry["meta"]
        lines += [f"## {suite}", "",
                  f"Device: {meta['device']}; torch {meta['torch']}; commit {meta['commit']}; {meta['date']}. "
                  f"Scale `{entry['scale_name']}`: " + ", ".join(f"{k}={'default' if v is None else v}"
                                                                 for k, v in scale.items()
                                                                 if not (suite == "fashion" and k == "data")) + "; "
                  f"seeds {entry['seeds']}.", "",
                  "(`default`: the whole split / the paper recipe's epochs.)", "",
                  "| setting | vanilla | BISE | BISE+FT | worst group (BISE) | weights removed | units pruned "
                  "| MMACs vanilla -> BISE | max export diff |", "|---|---|---|---|---|---|---|---|---|"]
        groups: dict[str, list] = {}
        for row in entry["runs"]:
            groups.setdefault(row["group"], []).append(row)
        for group, rows in groups.items():
            col = lambda k: [r[k] for r in rows]  # noqa: E731
            lines.append(f"| {group} | {_mean_std(col('vanilla'))} | {_mean_std(col('bise'))} | "
                         f"{_mean_std(col('bise_ft'))} | {_mean_std(col('worst_group_bise'))} | "
                         f"{_mean_std(col('weights_removed'))} | {_mean_std(col('units_pruned'))} | "
                         f"{_plain_mean(col('mflops_vanilla'), '.2f')} -> {_plain_mean(col('mflops_bise'), '.2f')} | "
                         f"{max(col('max_abs_diff')):.1e} |")
        lines.append("")
    return "\n".join(lines)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BISE_COMMIT", "unknown")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", action="append", choices=("main", "ablation", "fashion"))
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-train", type=int, help="cap the training images (overrides the scale)")
    a = parser.parse_args(argv)
    scale = dict(SCALES[a.scale], **({"n_train": a.n_train} if a.n_train else {}))
    scale_name = a.scale if not a.n_train else f"{a.scale}, n_train={a.n_train}"
    store = RESULTS / "bise-results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else \
        f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    for suite in a.suite or ["main"]:
        rows = []
        for cfg in configurations(suite, a.seeds, scale):
            report = run_one(cfg, scale, RUNS / scale_name.replace(", ", "-") / suite / cfg["name"], a.device)
            rows.append({"name": cfg["name"], "group": cfg["group"], "data": cfg["data"], **_row(report)})
            print(f"{suite}/{cfg['name']}: vanilla {rows[-1]['vanilla']:.3f} -> BISE {rows[-1]['bise']:.3f}"
                  + (f" -> FT {rows[-1]['bise_ft']:.3f}" if rows[-1]["bise_ft"] is not None else ""), flush=True)
        results[suite] = {"scale_name": scale_name, "scale": scale, "seeds": a.seeds, "runs": rows,
                          "meta": {"device": device, "torch": torch.__version__, "commit": _commit(),
                                   "date": datetime.date.today().isoformat()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for path, text in ((store, json.dumps(results, indent=1)), (DOC, render(results))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(f"-> {DOC}, {store}")


if __name__ == "__main__":
    main()
