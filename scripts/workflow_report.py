"""Per-phase wall clock of a `bise run` against the GPU targets of the workflow (docs/workflow.md).

``python scripts/workflow_report.py RUN_DIR/report.json [--wall-seconds S] [--out workflow.json]``
reads the phase times and settings that ``bise run`` records in report.json and writes (and prints) one JSON
with the machine, versions, commit, the seconds of every phase, the derived figures (vanilla
step, mask epoch, whole schedule) and, for each target, the figure and whether it is met.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path

import torch

from bise_kernels.info import source_commit

TARGETS = {"vanilla_step_ms": 2.0, "mask_epoch_seconds": 0.3, "whole_schedule_seconds": 180.0}


def report(run_report: dict, wall_seconds: float | None = None) -> dict:
    """The workflow report of a run's report.json (see the module docstring)."""
    timing, config = run_report["timing"], run_report["config"]
    vanilla, extraction = config.get("vanilla", {}), config["extraction"]
    epochs_run = extraction["result"]["mask_epochs_run"]
    steps = vanilla.get("epochs", 0) * math.ceil(config["data"]["sizes"]["train"] / vanilla.get("batch_size", 1))
    phases = {k: v for k, v in timing.items() if k.endswith("_seconds") and not isinstance(v, dict)}
    whole = sum(timing.get(k, 0.0) for k in ("vanilla_training_seconds", "extraction_seconds", "export_seconds",
                                              "finetune_seconds", "evaluation_seconds"))
    figures = {
        "vanilla_step_ms": 1e3 * timing["vanilla_training_seconds"] / steps if steps else None,
        "mask_epoch_seconds": timing["extraction_mask_epochs_seconds"] / max(epochs_run, 1),
        "whole_schedule_seconds": wall_seconds if wall_seconds is not None else whole,
    }
    device = extraction.get("device", "cpu")
    return {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available()
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "python": platform.python_version(), "commit": source_commit()["commit"],
        "data": config["data"]["spec"], "arch": config.get("arch"), "amp": extraction.get("amp", False),
        "schedule": {"vanilla_epochs": vanilla.get("epochs"), "vanilla_steps": steps,
                     "mask_epochs": epochs_run, "head_epochs": extraction["head_epochs"]},
        "phases_seconds": phases, "phases_total_seconds": whole, "wall_seconds": wall_seconds,
        "figures": figures,
        "targets": {k: {"target": t, "value": figures[k], "met": figures[k] is not None and figures[k] <= t}
                    for k, t in TARGETS.items()},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report_json", type=Path, help="the report.json of a `bise run`")
    parser.add_argument("--wall-seconds", type=float, help="wall clock of the whole `bise run` command")
    parser.add_argument("--out", type=Path, help="where to write the report (default: print only)")
    args = parser.parse_args(argv)
    result = report(json.loads(args.report_json.read_text()), args.wall_seconds)
    text = json.dumps(result, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
