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
    assert case["elapsed_s"] > 0
    render = _load("render_results").render
    # a dry run's numbers mean nothing: it never reaches the README's table (71 such rows once did)
    assert render([run]) == _load("render_results").NO_RESULTS
    run["dry_run"] = False  # as if measured on a GPU
    table = render([run])
    assert table.count("\n") == 2 and "select_resnet50_batched/torch" in table
    # a run on uncommitted changes says so next to its commit (the README showed such rows as clean)
    commit = run["commit"][:8]
    assert f"| {commit}+dirty |" in render([dict(run, dirty=True)])
    assert f"| {commit} |" in render([dict(run, dirty=False)])


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
    for case in run["cases"]:  # what an anchored --filter relies on to build only the modules it can match
        assert case["name"].startswith(suite.MODULE_PREFIXES[case["module"]]), case["name"]
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
    # the steps, the overhead and the graph probe (cheap) before the ~50 masked cases, whose
    # max-autotune baselines could otherwise starve them
    cases = [{"name": n, "backend": b, "module": m} for n, b, m in (
        ("workflow_step", "auto", "bench_workflow_gpu"), ("select/cuda", "cuda", "bench_select_gpu"),
        ("select/triton", "triton", "bench_select_gpu"), ("select/api", "auto", "bench_select_gpu"),
        ("masked/triton", "triton", "bench_masked_gpu"), ("masked/cuda", "cuda", "bench_masked_gpu"),
        ("step", "auto", "bench_step_gpu"), ("step/triton", "triton", "bench_step_gpu"),
        ("cuda_graph_probe", "auto", "bench_step_gpu"))]
    assert [c["name"] for c in _load("gpu_suite").in_budget_order(cases)] == [
        "select/cuda", "select/api", "step", "cuda_graph_probe", "masked/cuda", "select/triton", "step/triton",
        "masked/triton", "workflow_step"]


# ----------------------------------------------------------------------------- the device call's harness

ROOT = BENCHMARKS.parent
STUB = """#!/bin/bash
# python3 on the device, faked: what the harness's shell logic does around it, and when
echo "$(date +%s.%N) DEADLINE_S=${DEADLINE_S:-} $*" >>"$STUB_LOG"
[ "${1:-}" = "-" ] && exit 0
case "$*" in
  *"import torch, triton"*) exec sleep "$S_IMPORT";;
  *"import torch_pruning"*|*"import pytest_timeout"*) exit 0;;
  *"bise_kernels._C"*) exit 1;;
  *setup.py*) exec sleep "$S_BUILD";;
  *--summarize-tests*) echo '{}'; exit 0;;
  *) exec sleep "${S_OTHER:-1000}";;
esac
"""


def _stub_env(tmp_path, **extra):
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python3").write_text(STUB)
    (bin_dir / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DEADLINE_S", "PYTHON")}
    env.update({"PATH": f"{bin_dir}:{env['PATH']}", "STUB_LOG": str(tmp_path / "stub.log"), "S_IMPORT": "2",
                "S_BUILD": "2", "BISE_OFFICIAL_DIR": str(tmp_path / "no-official"),
                "BISE_RUN_DIR": str(tmp_path / "run"), **extra})
    return env


def test_the_deadline_counts_from_the_start_of_the_device_call(tmp_path):
    """DEADLINE_S bounds the whole call: the session file's `import torch, triton` (2 s here), the
    workflow's fallback build (2 s) and the wheel check came on top of it (DEADLINE_S=30 took 34 s and
    43 s); the part's script gets what is left."""
    import subprocess

    deadline = 7
    runs = {}
    for part in ("kernels", "workflow"):
        (tmp_path / part).mkdir()
        env = _stub_env(tmp_path / part, DEADLINE_S=str(deadline), RESERVE_S="1")
        runs[part] = (time.monotonic(), subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "device_session.sh"), part, str(tmp_path / part / "out")], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for part, (began, proc) in runs.items():
        out, _ = proc.communicate(timeout=60)
        wall = time.monotonic() - began
        assert wall <= deadline + 1.5, (part, wall, out)
        calls = (tmp_path / part / "stub.log").read_text().splitlines()
        child = [c for c in calls if "gpu_suite.py" in c or "pytest" in c]
        assert child, calls
        # the part's script was handed what was left after the 2 s import (and the 2 s build)
        handed = int(child[0].split("DEADLINE_S=")[1].split()[0])
        assert handed <= deadline - (4 if part == "workflow" else 2) + 1, calls
        text = (tmp_path / part / "out" / f"session-{part}.txt").read_text()
        assert f"part={part} dry=0 deadline_s={deadline}" in text and "s left]" in text, text
    assert runs["workflow"][1].returncode == 5  # no workflow.json: the run had no time


def test_a_dry_run_without_out_writes_into_a_temporary_folder(tmp_path):
    """`device_session.sh --dry-run kernels` without OUT wrote into benchmarks/results, and
    update_readme.py then put its cpu-dry-run rows into README.md."""
    import subprocess

    before = sorted(p.name for p in (BENCHMARKS / "results").iterdir())
    done = subprocess.run(["bash", str(ROOT / "scripts" / "device_session.sh"), "--dry-run", "kernels"],
                          env=_stub_env(tmp_path, S_IMPORT="0", S_OTHER="0"), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (BENCHMARKS / "results").iterdir()) == before
    out = Path(done.stdout.split(" out=", 1)[1].split()[0])
    assert out.resolve() != (BENCHMARKS / "results").resolve() and (out / "session-kernels.txt").is_file()
    suite_call = [c for c in (tmp_path / "stub.log").read_text().splitlines() if "gpu_suite.py" in c]
    assert f"--out {out}" in suite_call[0]


def test_a_cut_bise_run_leaves_its_progress(tmp_path):
    """A `bise run` cut by its limit left nothing in OUT (its run.json and checkpoint stayed in the run
    folder) and said "(rc 0)": its status and what it did now come back, with exit status 5."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", WORKFLOW_TIMEOUT_S="4",
               BISE_OFFICIAL_DIR=str(tmp_path / "no-official"), BISE_RUN_DIR=str(tmp_path / "run"))
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_workflow.sh"), "--dry-run", str(out)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert done.returncode == 5, done.stdout[-2000:] + done.stderr[-2000:]
    assert "was cut by its time limit of 4 s" in done.stdout and "(rc 0)" not in done.stdout
    progress = json.loads((out / "run-progress.json").read_text())
    assert progress["rc"] == 124 and progress["cut_by_time_limit"] is True and progress["limit_s"] == 4
    assert 3.5 <= progress["elapsed_s"] < 10
    assert set(progress["files_s"]) == {p.name for p in (tmp_path / "run").iterdir() if p.is_file()}
    if (tmp_path / "run" / "run.json").exists():
        assert (out / "run.json").read_text() == (tmp_path / "run" / "run.json").read_text()
        assert isinstance(progress["steps_s"], dict)
    if "checkpoint.pt" in progress["files_s"]:
        assert "timing_s" in progress["checkpoint"] or "error" in progress["checkpoint"]
    assert not (out / "workflow.json").exists() and progress["started"] is True
    # no time left for the run: it did not start, and says so (it said "cut by its time limit of 1 s")
    late = tmp_path / "late"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_workflow.sh"), "--dry-run", str(late)],
                          capture_output=True, text=True, env={**env, "DEADLINE_S": "10"}, timeout=120, cwd=ROOT)
    assert done.returncode == 5 and "bise run did not start" in done.stdout, done.stdout[-2000:]
    progress = json.loads((late / "run-progress.json").read_text())
    assert (progress["started"], progress["rc"], progress["cut_by_time_limit"]) == (False, None, False)


def _case_record(error_baseline: bool = True):
    def boom():
        raise RuntimeError("out of memory\nsecond line | with a bar")

    return {"name": "c", "fn": lambda: None, "baselines": {"dense": boom if error_baseline else (lambda: None),
                                                           "raw": lambda: None},
            "target_speedup": {"dense": 0.9}, "overhead_vs": "raw", "target_overhead_us": 10.0}


def test_a_target_whose_baseline_failed_is_unknown_not_missed(monkeypatch):
    suite = _load("gpu_suite")

    def fake(fn, dry_run, timer):
        fn()
        return {"median_us": 100.0, "p20_us": 0, "p80_us": 0}

    monkeypatch.setattr(suite, "time_us", fake)
    record = suite.run_case(_case_record(), dry_run=False)
    assert record["meets_target"] is None and record["targets_unchecked"] == ["dense"]
    assert "out of memory" in record["baselines"]["dense"]["error"] and "dense" not in record["speedup"]
    table = _load("render_results").render([{"gpu": "g", "commit": "c", "cases": [record]}])
    assert table.count("\n") == 2, table  # the error's line break stays out of the table
    row = table.splitlines()[2]
    assert "unknown (baseline failed: dense)" in row and "missed" not in row
    assert "dense error: RuntimeError: out of memory second line / with a bar" in row
    # a missed target stays missed whatever else failed
    slow = dict(_case_record(), target_us=1.0)
    assert suite.run_case(slow, dry_run=False)["meets_target"] is False


def test_an_error_with_line_breaks_stays_in_its_row_and_a_probe_shows_its_outcome():
    render = _load("render_results").render
    cases = [{"name": "broken", "error": "RuntimeError: CUDA error\nline two\r\nline | three", "traceback": "..."},
             {"name": "cuda_graph_masked_step/api", "backend": "auto", "captured": True, "replayed": False,
              "error": "RuntimeError: replay\nfailed", "elapsed_s": 1.5}]
    table = render([{"gpu": "g", "commit": "c", "cases": cases}])
    lines = table.splitlines()
    assert len(lines) == 4, table
    assert "error: RuntimeError: CUDA error line two line / three" in lines[2]
    # the probe's outcome (captured, not replayed) with its error, not the error alone
    assert "captured True, replayed False, error RuntimeError: replay failed" in lines[3], lines[3]
    assert all(line.count("|") == 8 for line in lines[2:]), table


def test_shared_baselines_are_timed_once_per_input(monkeypatch):
    """kthvalue at full size costs 0.1-0.6 s a call: re-timed for each backend's case it took ~16 s."""
    suite = _load("gpu_suite")
    calls = []

    def fake(fn, dry_run, timer):
        calls.append(fn)
        return {"median_us": 10.0, "p20_us": 0, "p80_us": 0}

    monkeypatch.setattr(suite, "time_us", fake)
    kth = lambda: None  # noqa: E731
    cache = {}
    first = suite.run_case({"name": "a/cuda", "fn": lambda: None, "baselines": {"kth": kth}}, False,
                           baseline_cache=cache)
    second = suite.run_case({"name": "a/triton", "fn": lambda: None, "baselines": {"kth": kth}}, False,
                            baseline_cache=cache)
    assert calls.count(kth) == 1
    assert second["baselines"]["kth"] == dict(first["baselines"]["kth"], shared_with="a/cuda")
    assert second["speedup"] == {"kth": 1.0}
    # the selection module shares one callable per input between its backends' cases
    select = _load("bench_select_gpu")
    monkeypatch.setattr(select, "_kernel", lambda backend, kernel: (lambda *a: None))
    cases = select._keep_mask_cases(("torch", "other"), "cpu", 1e-4)
    assert cases[0]["baselines"]["torch.topk+scatter"] is cases[1]["baselines"]["torch.topk+scatter"]


def test_an_anchored_filter_builds_only_the_modules_it_can_match(monkeypatch):
    """`--filter workflow_` built every module's cases (GBs on the GPU) before filtering them."""
    import importlib

    suite = _load("gpu_suite")
    imported = []
    real = importlib.import_module
    monkeypatch.setattr(suite.importlib, "import_module", lambda name: imported.append(name) or real(name))
    cases, notes = suite.load_cases(True, "^workflow_")
    assert imported == ["bench_workflow_gpu"] and notes == []
    assert cases and all(c["name"].startswith("workflow_") for c in cases)
    assert suite.name_matches("select_x/cuda", "x/cu") and not suite.name_matches("select_x/cuda", "^x/cu")
    assert [m for m in suite.CASE_MODULES if suite._may_match(m, "^step")] == ["bench_step_gpu"]
    assert all(suite._may_match(m, "masked_") for m in suite.CASE_MODULES)  # unanchored: any module


def test_the_gpu_tests_summary_names_what_passed_failed_and_was_cut(tmp_path):
    """run_gpu.sh ran pytest -q: a run cut by its time limit left dots, and no test names."""
    suite = _load("gpu_suite")
    log = "\n".join([
        "== -k 'not triton'",
        "tests/kernels/test_select_cuda.py::test_a[1] PASSED                 [ 10%]",
        "tests/kernels/test_select_cuda.py::test_b FAILED                    [ 20%]",
        "tests/kernels/test_masked_cuda.py::test_c SKIPPED (needs x)         [ 30%]",
        "=========================== short test summary info ============================",
        "FAILED tests/kernels/test_select_cuda.py::test_b - AssertionError: differs",
        "== -k 'triton'",
        "tests/kernels/test_select_triton.py::test_d PASSED                  [ 50%]",
        "tests/kernels/test_select_triton.py::test_e "])
    junit = tmp_path / "t.xml"
    junit.write_text(
        '<testsuites><testsuite>'
        '<testcase classname="tests.kernels.test_select_cuda" name="test_a[1]" time="1.5"/>'
        '<testcase classname="tests.kernels.test_select_cuda" name="test_b" time="3.25">'
        '<failure message="AssertionError: differs">trace</failure></testcase>'
        '<testcase classname="tests.kernels.test_masked_cuda" name="test_c" time="0.01">'
        '<skipped message="needs x"/></testcase>'
        '</testsuite></testsuites>')
    summary = suite.summarize_gpu_tests(log, [junit, tmp_path / "missing.xml"])
    assert summary["counts"] == {"passed": 2, "failed": 1, "skipped": 1, "cut": 1}
    assert summary["cut"] == "tests/kernels/test_select_triton.py::test_e"
    assert summary["not_passed"] == {"tests/kernels/test_select_cuda.py::test_b": {
        "outcome": "failed", "message": "AssertionError: differs", "seconds": 3.25}}
    assert summary["slowest"][0] == {"test": "tests/kernels/test_select_cuda.py::test_b", "seconds": 3.25}
    log_path = tmp_path / "gpu-tests.log"
    log_path.write_text(log + "\nno time left for -k 'triton'\n")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        suite.main(["--summarize-tests", str(log_path)])
    assert json.loads(printed.getvalue())["not_run"] == ["triton"]


def test_a_sigterm_to_the_device_call_ends_the_parts_script_too(tmp_path):
    """The part's script ran as a plain child: a SIGTERM to device_session.sh ended the shell and left the
    child running (orphaned) and writing; it is forwarded now, and the call's log is complete."""
    import signal
    import subprocess

    env = _stub_env(tmp_path, S_IMPORT="0", S_OTHER="30")
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "device_session.sh"), "--dry-run", "kernels",
                             str(tmp_path / "out")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "stub.log"
    deadline = time.monotonic() + 20
    while not (log.is_file() and "gpu_suite.py" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)  # the suite (a 30 s sleep) has started
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) != 0
    stub = subprocess.run(["pgrep", "-f", "sleep 30"], capture_output=True, text=True).stdout.split()
    children = [p for p in stub if subprocess.run(["cat", f"/proc/{p}/environ"], capture_output=True).stdout
                .find(str(tmp_path).encode()) >= 0]
    assert not children, "the part's script outlived the call"
    assert "part=kernels dry=1" in (tmp_path / "out" / "session-kernels.txt").read_text()


def test_cpu_rows_leave_out_the_triton_interpreters_times():
    """bench_memory times every CPU backend, Triton under TRITON_INTERPRET too: rows of 47,612 ms in the README
    read as Triton's speed."""
    stats = {"median": 0.5}
    run = {"machine_info": {"cpu": {"brand_raw": "cpu", "count": 2}}, "commit_info": {"id": "abc"},
           "benchmarks": [{"name": "test_x[weight-cpp]", "stats": stats}, {"name": "test_x[weight-triton]",
                                                                             "stats": stats}]}
    table = _load("render_results").render([run])
    assert "test_x[weight-cpp]" in table and "triton" not in table
