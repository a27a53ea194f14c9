"""The GPU suite's wiring (dry run on the CPU) and the results renderer behind the README table."""

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_results_with_no_result_files_prints_a_note(tmp_path, monkeypatch, capsys):
    render = _load("render_results")
    monkeypatch.setattr(render, "RESULTS", tmp_path)
    render.main([])
    assert "No GPU results yet" in capsys.readouterr().out


def test_dry_run_checks_times_and_writes_a_renderable_result(tmp_path):
    suite = _load("gpu_suite")
    path = suite.main(["--dry-run", "--out", str(tmp_path), "--filter", "resnet50"])
    run = json.loads(path.read_text())
    assert path.name.startswith("cpu-dry-run-") and path.suffix == ".json"
    for key in ("gpu", "torch", "triton", "cuda", "commit", "date"):
        assert key in run
    (case,) = run["cases"]
    assert case["name"] == "select_resnet50_batched/torch" and case["checked"] is True
    assert case["p20_us"] <= case["median_us"] <= case["p80_us"] and case["gbps"] > 0
    assert set(case["speedup"]) == {"loop torch.kthvalue", "loop torch.topk", "loop torch.sort"}
    table = _load("render_results").render([run])
    assert table.count("\n") == 2 and "select_resnet50_batched/torch" in table


def test_a_failing_case_is_recorded_and_the_suite_goes_on():
    suite = _load("gpu_suite")

    def broken():
        raise RuntimeError("boom")

    record = suite.run_case({"name": "broken", "fn": broken, "baselines": {}}, dry_run=True)
    assert "RuntimeError: boom" in record["error"]
    table = _load("render_results").render([{"gpu": "g", "commit": "c", "cases": [record]}])
    assert "error: RuntimeError: boom" in table
