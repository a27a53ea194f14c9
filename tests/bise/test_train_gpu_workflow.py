"""The one GPU workflow command (scripts/gpu_workflow.sh) in its CPU dry run, and its report."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _report_module():
    spec = importlib.util.spec_from_file_location("workflow_report", ROOT / "scripts" / "workflow_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_derives_the_figures_and_checks_the_targets():
    run = {"timing": {"vanilla_training_seconds": 1.12, "extraction_seconds": 40.0, "extraction_mask_epochs_seconds":
                      25.0, "export_seconds": 1.0, "evaluation_seconds": 2.0},
           "config": {"data": {"spec": "biased-mnist:rho=0.997", "sizes": {"train": 7000}}, "arch": "simple-cnn",
                      "vanilla": {"arch": "simple-cnn", "epochs": 8, "batch_size": 100},
                      "extraction": {"head_epochs": 50, "device": "cpu", "result": {"mask_epochs_run": 100}}}}
    r = _report_module().report(run)
    assert r["schedule"]["vanilla_steps"] == 560
    assert r["figures"]["vanilla_step_ms"] == pytest.approx(2.0)
    assert r["figures"]["mask_epoch_seconds"] == pytest.approx(0.25)
    assert r["figures"]["whole_schedule_seconds"] == pytest.approx(44.12)
    assert r["targets"]["vanilla_step_ms"]["met"] and r["targets"]["mask_epoch_seconds"]["met"]
    assert _report_module().report(run, wall_seconds=200.0)["targets"]["whole_schedule_seconds"]["met"] is False
    assert r["arch"] == "simple-cnn"  # config's own (the vanilla's settings of a run --model have none: it said None)
    del run["timing"]["vanilla_training_seconds"]  # run --model: no training, no such phase
    run["config"]["vanilla"] = {"from": "/somewhere/vanilla.pt", "health": {}}
    r = _report_module().report(run)
    assert r["arch"] == "simple-cnn" and r["figures"]["vanilla_step_ms"] is None
    assert r["phases_total_seconds"] == pytest.approx(43.0)


@pytest.mark.skipif(sys.platform != "linux", reason="a bash script")
def test_gpu_workflow_script_dry_run(tmp_path):
    # an "official code" folder whose src/ is empty: the optional official step runs, fails, and the
    # script still ends with its report (the step is last and may not fail the call)
    (tmp_path / "official" / "src").mkdir(parents=True)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", BISE_OFFICIAL_DIR=str(tmp_path / "official"),
               BISE_RUN_DIR=str(tmp_path / "run"))
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_workflow.sh"), "--dry-run", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "official comparison failed" in proc.stdout and not (out / "official.json").exists()
    # The device tool brings back at most 8 files from $OUT (../shared/gpu/README.md): the run's own
    # folder stays out; on the GPU the suite's JSON, official.json and a build log may join these.
    assert sorted(p.name for p in out.rglob("*")) == ["run-report.json", "workflow.json"]
    assert (tmp_path / "run" / "report.json").exists()
    report = json.loads((out / "workflow.json").read_text())
    assert report["schedule"] == {"vanilla_epochs": 1, "vanilla_steps": report["schedule"]["vanilla_steps"],
                                  "mask_epochs": 2, "head_epochs": 1}
    for phase in ("vanilla_training", "extraction_head_pretraining", "extraction_mask_epochs",
                  "extraction_evaluation", "export", "evaluation"):
        assert report["phases_seconds"][f"{phase}_seconds"] > 0
    assert set(report["targets"]) == {"vanilla_step_ms", "mask_epoch_seconds", "whole_schedule_seconds"}
