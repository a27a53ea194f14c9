"""The GPU suite's wiring (dry run on the CPU) and the results renderer behind the README table."""

import importlib.util
import json
import time
from pathlib import Path

import pytest

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
    path = suite.main(["--dry-run", "--out", str(tmp_path), "--filter", "select_resnet50"])
    run = json.loads(path.read_text())
    assert path.name.startswith("cpu-dry-run-") and path.name.endswith("-select-resnet50.json")  # the filter
    for key in ("gpu", "torch", "triton", "cuda", "commit", "date"):
        assert key in run
    (case,) = run["cases"]
    assert case["name"] == "select_resnet50_batched/torch" and case["checked"] is True
    assert case["p20_us"] <= case["median_us"] <= case["p80_us"] and case["gbps"] > 0
    assert set(case["speedup"]) == {"one_read", "loop torch.kthvalue", "loop torch.topk", "loop torch.sort"}
    table = _load("render_results").render([run])
    assert table.count("\n") == 2 and "select_resnet50_batched/torch" in table
    # a run on uncommitted changes says so next to its commit (the README showed such rows as clean)
    commit = run["commit"][:8]
    assert f"| {commit}+dirty |" in _load("render_results").render([dict(run, dirty=True)])
    assert f"| {commit} |" in _load("render_results").render([dict(run, dirty=False)])


def test_a_failing_case_is_recorded_and_the_suite_goes_on():
    suite = _load("gpu_suite")

    def broken():
        raise RuntimeError("boom")

    record = suite.run_case({"name": "broken", "fn": broken, "baselines": {}}, dry_run=True)
    assert "RuntimeError: boom" in record["error"]
    table = _load("render_results").render([{"gpu": "g", "commit": "c", "cases": [record]}])
    assert "error: RuntimeError: boom" in table


def test_dry_run_of_every_module_checks_every_case(tmp_path):
    """Every case of every module runs (or is skipped with a reason) and lands in the JSON."""
    suite = _load("gpu_suite")
    run = json.loads(suite.main(["--dry-run", "--out", str(tmp_path)]).read_text())
    assert run["notes"] == [] and "wall_s" in run
    names = [c["name"] for c in run["cases"]]
    assert len(names) == len(set(names))
    for case in run["cases"]:
        assert "error" not in case, case
        if case["module"] in ("bench_select_gpu", "bench_masked_gpu", "bench_step_gpu"):  # their cases all check
            assert case.get("checked") or case.get("skipped"), case
    for prefix in ("select_25M_fp32_cold/", "masked_linear_fwd_bf16_64/", "masked_conv_fwd_bwd", "channel_gate_bwd",
                   "step_mlp4x64_bf16_b8/", "step_resnet50_convs", "overhead_masked_linear_256_b32/api",
                   "overhead_masked_linear_256_b32/module", "masked_linear_keep_fwd_bf16_M16_64x64/api",
                   "masked_linear_keep_fwd_bwd_bf16_M16_64x64/torch", "masked_linear_keep_fwd_bwd_bf16_M16_64x64/api",
                   "step_mlp4x64_bf16_b8/torch+keep", "masked_conv_keep_fwd_bwd",
                   "cuda_graph_masked_step/api"):
        assert any(n.startswith(prefix) for n in names), prefix
    by_name = {c["name"]: c for c in run["cases"]}
    assert "one_read" in by_name["select_25M_fp32_cold/torch"]["speedup"]
    api = by_name["select_25M_fp32_cold/api"]
    assert api["overhead_us"] == api["median_us"] - api["baselines"]["raw_kernel"]["median_us"]
    assert {"cublas_dense", "materialise_then_cublas"} <= set(by_name["masked_linear_fwd_bf16_64/api"]["speedup"])
    assert {"dense_step", "edge_popup"} <= set(by_name["step_mlp4x64_bf16_b8/auto"]["speedup"])
    for path in ("torch", "api"):  # the packed-mask layer step at small M, beside what a user writes by hand
        assert set(by_name[f"masked_linear_keep_fwd_bwd_bf16_M16_64x64/{path}"]["speedup"]) == {
            "materialise_then_cublas", "cublas_dense", "selection_path"}


def test_a_case_past_its_time_limit_is_recorded_and_the_budget_skips_the_rest(tmp_path):
    import time

    suite = _load("gpu_suite")
    record = suite.run_case({"name": "slow", "fn": lambda: time.sleep(5)}, dry_run=True, timeout_s=0.2)
    assert "ran past" in record["error"]
    run = json.loads(suite.main(["--dry-run", "--out", str(tmp_path), "--filter", "select_resnet50",
                                 "--budget-s", "0"]).read_text())
    assert all("budget" in c["skipped"] for c in run["cases"])


def test_targets_give_meets_target_from_the_ratios(monkeypatch):
    suite = _load("gpu_suite")
    times = iter([100.0, 95.0, 300.0])
    monkeypatch.setattr(suite, "time_us", lambda fn, dry_run, timer: {"median_us": next(times), "p20_us": 0,
                                                                       "p80_us": 0})
    case = {"name": "c", "fn": None, "baselines": {"dense": None, "raw": None}, "target_speedup": {"dense": 0.9},
            "overhead_vs": "raw", "target_overhead_us": 10.0}
    record = suite.run_case(case, dry_run=False)
    assert record["speedup"] == {"dense": 0.95, "raw": 3.0} and record["overhead_us"] == -200.0
    assert record["meets_target"] is True
    times = iter([100.0, 80.0, 95.0])
    assert suite.run_case(case, dry_run=False)["meets_target"] is False


def test_host_bound_cases_are_timed_on_the_wall(tmp_path):
    """do_bench times GPU events of calls queued back to back: a small layer's host cost (the per-call
    target) and an API's checks (its overhead target) hid behind the GPU work. Those cases (and their
    baselines) are timed on the wall clock: "wall" synchronised at a loop's ends, "latency" per call."""
    suite = _load("gpu_suite")
    syncs = []
    ms = suite._wall_bench(lambda: time.sleep(0.002), lambda: syncs.append(1), per_call=True, rounds=3, calls=4)
    assert len(syncs) == 4 * (4 + 2) and 2.0 <= ms[0] < 10.0  # 3 rounds and the warm-up, each call synchronised
    syncs.clear()
    suite._wall_bench(lambda: None, lambda: syncs.append(1), per_call=False, rounds=3, calls=4)
    assert len(syncs) == 4 * 2
    with pytest.raises(ValueError, match="timer must be one of"):
        suite.time_us(lambda: None, False, "host")
    run = json.loads(suite.main(["--dry-run", "--out", str(tmp_path), "--filter", "overhead_masked_linear"]).read_text())
    assert {c["name"]: c["timer"] for c in run["cases"]} == {"overhead_masked_linear_256_b32/api": "wall",
                                                             "overhead_masked_linear_256_b32/module": "wall"}


def test_a_probe_case_records_its_outcome():
    suite = _load("gpu_suite")
    record = suite.run_case({"name": "graph", "probe": lambda: {"captured": True}}, dry_run=True)
    assert record == {"name": "graph", "captured": True}


def test_device_session_workflow_dry_run_writes_the_workflow_report(tmp_path):
    """scripts/device_session.sh's second call, wired on the CPU: a tiny `bise run` and its report."""
    import subprocess

    root = BENCHMARKS.parent
    done = subprocess.run(["bash", str(root / "scripts" / "device_session.sh"), "--dry-run", "workflow", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "part=workflow dry=1 deadline_s=270" in (tmp_path / "session-workflow.txt").read_text()
    report = json.loads((tmp_path / "workflow.json").read_text())
    assert report["wall_seconds"] > 0 and report["schedule"]["mask_epochs"] == 2, report
    assert set(report["targets"]) == {"vanilla_step_ms", "mask_epoch_seconds", "whole_schedule_seconds"}


def test_a_cut_run_keeps_the_default_paths_then_triton_then_the_workflow_cases():
    cases = [{"name": n, "backend": b, "module": m} for n, b, m in (
        ("workflow_step", "auto", "bench_workflow_gpu"), ("select/cuda", "cuda", "bench_select_gpu"),
        ("select/triton", "triton", "bench_select_gpu"), ("select/api", "auto", "bench_select_gpu"),
        ("masked/triton", "triton", "bench_masked_gpu"), ("masked/cuda", "cuda", "bench_masked_gpu"),
        ("step", "auto", "bench_step_gpu"))]
    assert [c["name"] for c in _load("gpu_suite").in_budget_order(cases)] == [
        "select/cuda", "select/api", "masked/cuda", "step", "select/triton", "masked/triton", "workflow_step"]
