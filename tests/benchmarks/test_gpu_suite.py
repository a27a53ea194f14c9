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
    assert {"dense_fwd_bwd", "materialise_fwd_bwd"} <= set(by_name["overhead_masked_linear_256_b32/module"]["speedup"])
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
    times = iter([100.0, 90.0, 95.0])  # a speed-up exactly at its minimum meets it
    assert suite.run_case(case, dry_run=False)["meets_target"] is True


def test_host_bound_cases_are_timed_on_the_wall(tmp_path):
    """do_bench times GPU events of calls queued back to back: a small layer's host cost (the per-call
    target) and an API's checks (its overhead target) hid behind the GPU work. Those cases (and their
    baselines) are timed on the wall clock: "wall" synchronised at a loop's ends, "latency" per call."""
    suite = _load("gpu_suite")
    syncs = []
    # 10 calls of 2 ms a round: ms per call, at least the sleep, and far from a round's 20 ms (a loaded
    # machine's late wake-ups took up to 3.5 ms a call)
    calls = 10
    ms = suite._wall_bench(lambda: time.sleep(0.002), lambda: syncs.append(1), per_call=True, rounds=3, calls=calls)
    assert len(syncs) == 4 * (calls + 2)  # 3 rounds and the warm-up, each call synchronised
    assert 2.0 <= ms[0] < 2.0 * calls
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
    43 s); the part's script gets what is left.

    What the part's script is handed (``handed``) shows that bug exactly, and the deadline leaves it 5 s
    after the 4 s of stubs (with 4 busy processes beside them on 2 cores, their start-ups took up to 2 s
    more: with a 7 s deadline the workflow's script was once handed 1 s). The call's wall time may pass
    the deadline, by design: each shell counts whole seconds (bash's SECONDS), a step gets at least 1 s
    (``cap``), and the steps after the deadline (the summary, the progress file) still run; under that
    load it ended up to 2.4 s past it. So the wall is bounded by the deadline plus 7 s; a step that
    ignores the deadline runs its stub's 1000 s sleep."""
    import subprocess

    deadline = 9
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
        assert wall <= deadline + 7, (part, wall, out)
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


# The interpreter gpu_workflow.sh is given as $PYTHON in the cut-run test: every call runs the real one; after a
# `-m bise run` that succeeded it waits (exec: the limit's SIGTERM reaches the sleep itself), so the run's
# time limit always cuts it, however fast the machine finished the tiny schedule (CI's did in 3.9 s of 4,
# exit 0). A run that fails still fails with its own status. A run cut while it works gets the SIGTERM too
# (timeout signals its whole process group): the stand-in then waits for the run's own clean-up before it
# ends, as the real interpreter would, or the progress would be written while the run still tidies its folder.
WAIT_AFTER_BISE_RUN = """#!/bin/bash
case "$*" in "-m bise run "*) ;; *) exec "$REAL_PYTHON" "$@";; esac
trap 'wait; exit 143' TERM
"$REAL_PYTHON" "$@" &
wait $! || exit $?
exec sleep 60
"""


def test_a_cut_bise_run_leaves_its_progress(tmp_path):
    """A `bise run` cut by its limit left nothing in OUT (its run.json and checkpoint stayed in the run
    folder) and said "(rc 0)": its status and what it did now come back, with exit status 5."""
    import os
    import subprocess
    import sys

    out, run = tmp_path / "out", tmp_path / "run"
    python = tmp_path / "python"
    python.write_text(WAIT_AFTER_BISE_RUN)
    python.chmod(0o755)
    env = dict(os.environ, PYTHON=str(python), REAL_PYTHON=sys.executable, OMP_NUM_THREADS="1",
               WORKFLOW_TIMEOUT_S="4", BISE_OFFICIAL_DIR=str(tmp_path / "no-official"),
               BISE_RUN_DIR=str(run))
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_workflow.sh"), "--dry-run", str(out)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert done.returncode == 5, done.stdout[-2000:] + done.stderr[-2000:]
    assert "was cut by its time limit of 4 s" in done.stdout and "(rc 0)" not in done.stdout
    progress = json.loads((out / "run-progress.json").read_text())
    assert progress["rc"] == 124 and progress["cut_by_time_limit"] is True and progress["limit_s"] == 4
    assert 3.5 <= progress["elapsed_s"] < 10
    # cut before it made its folder (torch's import and the data took the 4 s) or after: files_s says which
    assert set(progress["files_s"]) == ({p.name for p in run.iterdir() if p.is_file()} if run.is_dir() else set())
    if (run / "run.json").exists():
        assert (out / "run.json").read_text() == (run / "run.json").read_text()
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


def _time_us_100(fn, dry_run, timer):
    """A stand-in for gpu_suite.time_us: runs ``fn`` once (a failing baseline raises) and says 100 us."""
    fn()
    return {"median_us": 100.0, "p20_us": 0, "p80_us": 0}


def test_a_target_whose_baseline_failed_is_unknown_not_missed(monkeypatch):
    suite = _load("gpu_suite")
    monkeypatch.setattr(suite, "time_us", _time_us_100)
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
    select = _bench("bench_select_gpu")
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


def _state(pid: int) -> str:
    """The process's state letter (Linux /proc: R running, S sleeping in a system call such as wait)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[0]


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
    # the suite (a 30 s sleep) has started, and the shell waits for it (blocked: state S), so its trap that
    # forwards the SIGTERM is set: a SIGTERM between the fork and the trap (a loaded machine can deschedule
    # the shell there) ends the shell alone and orphans the suite, as before the forwarding
    while not (log.is_file() and "gpu_suite.py" in log.read_text() and _state(proc.pid) == "S"):
        assert time.monotonic() < deadline and proc.poll() is None, "the suite did not start"
        time.sleep(0.1)
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


# ----------------------------------------------------------------------------- audit: figures on the GPU path


def test_the_gpu_timers_get_the_quantiles_in_order_and_the_right_sync(monkeypatch):
    """On a GPU do_bench's quantiles come back in the order asked: median, p20, p80; "latency"
    synchronises every call, "wall" only the loop's ends (the dry run never reaches this path)."""
    import sys
    import types

    import triton

    suite = _load("gpu_suite")
    asked = []

    def do_bench(fn, quantiles):
        asked.append(quantiles)
        return [{0.5: 2.0, 0.2: 1.0, 0.8: 3.0}[q] for q in quantiles]

    testing = types.ModuleType("triton.testing")
    testing.do_bench = do_bench
    monkeypatch.setitem(sys.modules, "triton.testing", testing)
    monkeypatch.setattr(triton, "testing", testing, raising=False)
    assert suite.time_us(lambda: None, False, "gpu") == {"median_us": 2000.0, "p20_us": 1000.0, "p80_us": 3000.0}
    assert asked == [[0.5, 0.2, 0.8]]
    per_call_list = []
    monkeypatch.setattr(suite, "_wall_bench", lambda fn, sync, per_call: per_call_list.append(per_call) or [1, 1, 1])
    suite.time_us(lambda: None, False, "latency")
    suite.time_us(lambda: None, False, "wall")
    assert per_call_list == [True, False]


def test_the_wall_timer_leaves_out_its_warm_up_round():
    suite = _load("gpu_suite")
    first = [True]

    def fn():
        if first.pop() if first else False:
            time.sleep(0.2)  # a first call that compiles

    ms = suite._wall_bench(fn, lambda: None, per_call=False, rounds=1, calls=1)
    assert ms[0] < 50, ms


def test_gbps_and_tflops_are_the_case_bytes_and_flops_over_its_median(monkeypatch):
    suite = _load("gpu_suite")
    monkeypatch.setattr(suite, "time_us", lambda fn, dry_run, timer: {"median_us": 100.0, "p20_us": 0, "p80_us": 0})
    record = suite.run_case({"name": "c", "fn": None, "bytes": 2e6, "flops": 3e9}, dry_run=False)
    assert record["gbps"] == pytest.approx(20.0) and record["tflops"] == pytest.approx(30.0)


def test_distinct_baselines_of_one_case_are_timed_each_with_a_cache(monkeypatch):
    suite = _load("gpu_suite")
    medians = {}

    def fake(fn, dry_run, timer):
        return {"median_us": medians[fn], "p20_us": 0, "p80_us": 0}

    monkeypatch.setattr(suite, "time_us", fake)
    case_fn, a, b = (lambda: None), (lambda: None), (lambda: None)
    medians.update({case_fn: 10.0, a: 20.0, b: 40.0})
    record = suite.run_case({"name": "c", "fn": case_fn, "baselines": {"a": a, "b": b}}, False, baseline_cache={})
    assert record["speedup"] == {"a": 2.0, "b": 4.0}


def test_a_case_whose_check_fails_is_not_timed():
    suite = _load("gpu_suite")
    timed = []

    def wrong():
        raise AssertionError("differs from the reference")

    record = suite.run_case({"name": "c", "fn": lambda: timed.append(1), "check": wrong,
                             "baselines": {"b": lambda: None}}, dry_run=True)
    assert "differs from the reference" in record["error"] and "median_us" not in record and not timed
    assert "checked" not in record


def test_the_json_is_rewritten_after_every_case(tmp_path, monkeypatch):
    """A run killed during its second case keeps the first case's record under --out."""
    suite = _load("gpu_suite")
    cases = [{"name": "one", "fn": lambda: None}, {"name": "two", "fn": lambda: None}]
    monkeypatch.setattr(suite, "load_cases", lambda dry_run, name_filter="": (cases, []))
    seen = []
    real = suite.run_case

    def run_case(case, *args, **kwargs):
        if case["name"] == "two":
            (path,) = tmp_path.glob("*.json")
            seen.append([c["name"] for c in json.loads(path.read_text())["cases"]])
            raise KeyboardInterrupt  # the device call's time limit
        return real(case, *args, **kwargs)

    monkeypatch.setattr(suite, "run_case", run_case)
    with pytest.raises(KeyboardInterrupt):
        suite.main(["--dry-run", "--out", str(tmp_path)])
    assert seen == [["one"]]


def test_the_case_limit_is_prompt_covers_each_baseline_and_leaves_no_alarm():
    import signal

    suite = _load("gpu_suite")
    began = time.monotonic()
    record = suite.run_case({"name": "slow", "fn": lambda: time.sleep(5)}, dry_run=True, timeout_s=0.2)
    assert "ran past" in record["error"] and time.monotonic() - began < 2
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no alarm left to kill the suite later
    record = suite.run_case({"name": "c", "fn": lambda: None, "baselines": {"slow": lambda: time.sleep(5)}},
                            dry_run=True, timeout_s=0.2)
    assert "ran past" in record["baselines"]["slow"]["error"] and "slow" not in record["speedup"]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with suite.time_limit(30):  # a case that ends in time disarms its alarm (else SIGALRM kills the suite later)
        pass
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_case_and_its_baselines_together_end_by_the_suites_deadline(monkeypatch, tmp_path):
    """Each baseline had the whole case limit of its own: a case with four baselines ran up to five limits
    past the budget, and the device call's outer timeout then lost its record. Now every step is cut to
    the deadline, and a step with no time left is an error record at once (setitimer(0) means no limit)."""
    import signal

    suite = _load("gpu_suite")
    # the check takes 0.1 s of the 0.5 s: b0 still gets its whole 0.3 s limit (0.1 s to spare for a loaded
    # machine's delays), b1 what is left, b2 and b3 nothing
    case = {"name": "c", "check": lambda: time.sleep(0.1), "fn": lambda: None,
            "baselines": {f"b{i}": (lambda: time.sleep(5)) for i in range(4)}}
    began = time.monotonic()
    record = suite.run_case(case, dry_run=True, timeout_s=0.3, deadline=began + 0.5)
    assert time.monotonic() - began < 1.0  # was 0.1 + 4 x 0.3 = 1.3 s
    errors = [record["baselines"][f"b{i}"]["error"] for i in range(4)]
    assert all(e.startswith("CaseTimeout: ") for e in errors) and "ran past 0.3 s" in errors[0]
    assert "no time left before the suite's deadline" in errors[-1]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    late = suite.run_case({"name": "late", "fn": lambda: None}, dry_run=True, deadline=time.monotonic() - 1)
    assert "no time left" in late["error"] and "median_us" not in late
    deadlines = []
    monkeypatch.setattr(suite, "load_cases", lambda dry_run, name_filter="": ([{"name": "one", "fn": lambda: None}], []))
    real = suite.run_case
    monkeypatch.setattr(suite, "run_case", lambda *a, **k: (deadlines.append(k.get("deadline")), real(*a, **k))[1])
    start = time.monotonic()
    suite.main(["--dry-run", "--out", str(tmp_path), "--budget-s", "100", "--case-timeout-s", "7"])
    assert deadlines and start + 107 - 5 < deadlines[0] <= time.monotonic() + 107


def test_select_keep_mask_cases_of_an_unavailable_backend_are_recorded_as_skipped():
    select = _bench("bench_select_gpu")
    cases = select._keep_mask_cases(("cuda", "cuda-bracket"), "cpu", 1e-4)
    assert [c["name"] for c in cases] == ["select_keep_mask_25M_fp32/cuda", "select_keep_mask_25M_fp32/cuda-bracket"]
    assert all("unavailable" in c["skip"] for c in cases)


def test_the_fp32_forward_counts_its_bytes_once():
    """x, y and W in fp32 and the fp32 scores: 2 x the bf16 case's bytes counted the scores twice."""
    masked = _bench("bench_masked_gpu")
    cases = [c for c in masked.gpu_cases(dry_run=True) if c["name"].startswith("masked_linear_fwd_fp32")]
    d = masked._linear_data(masked.TINY, "cpu")
    assert cases and all(c["bytes"] == (d.m * d.k + d.m * d.n) * 4 + d.n * d.k * 8 for c in cases)


def test_a_failed_overhead_baseline_leaves_the_overhead_unknown(monkeypatch):
    suite = _load("gpu_suite")
    monkeypatch.setattr(suite, "time_us", _time_us_100)
    case = dict(_case_record(), overhead_vs="dense", target_speedup={})
    record = suite.run_case(case, dry_run=False)
    assert "overhead_us" not in record and record["meets_target"] is None
    assert record["targets_unchecked"] == ["dense"]


# ----------------------------------------------------------------------------- audit: the selection cases


def _bench(name):
    """A case module, imported as gpu_suite.load_cases does (benchmarks/ on sys.path for its helpers)."""
    import sys

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return _load(name)


def _select_cases():
    return {c["name"]: c for c in _bench("bench_select_gpu").gpu_cases(dry_run=True)}


def test_select_cases_have_the_documented_targets_sizes_timers_and_baselines():
    import torch

    from bise_kernels.backends import reference as ref

    cases = _select_cases()
    assert {n for n in cases if n.endswith("/api")} == {
        "select_25M_fp32_cold/api", "select_25M_fp32_warm/api", "select_12M_fp64_cold/api", "select_bert_base_global/api"}
    # a single tensor's targets are ratios to one read of it (issue #14: the same on an H100 and an H200)
    reads = {"select_25M_fp32_cold/torch": 2.0, "select_25M_fp32_warm/torch": 1.3, "select_12M_fp64_cold/torch": 2.0}
    for name, most in reads.items():
        assert cases[name].get("target_us") is None and cases[name]["target_speedup"] == {"one_read": 1 / most}, name
    for name, target in {"select_resnet50_batched/torch": 150.0, "select_bert_base_global/torch": 300.0}.items():
        assert cases[name].get("target_us") == target and not cases[name].get("target_speedup"), name
    for name, case in cases.items():
        if name.endswith("/api"):  # the API's overhead over the kernel "auto" picks, each call synchronised
            assert case["timer"] == "latency" and case.get("target_us") is None, name
            assert case.get("target_speedup") is None, name  # its one baseline is the raw kernel
            assert set(case["baselines"]) == {"raw_kernel"} and case["overhead_vs"] == "raw_kernel"
            assert case["target_overhead_us"] == 10.0
    fp32, fp64 = cases["select_25M_fp32_cold/torch"], cases["select_12M_fp64_cold/torch"]
    assert fp64["bytes"] == fp32["bytes"] == 4 * fp32["numel"] == 8 * fp64["numel"]  # the same 100 MB
    keep = cases["select_keep_mask_25M_fp32/torch"]
    assert keep["bytes"] == 5 * keep["numel"]  # 4 bytes read, 1 written
    # every kthvalue / topk baseline finds the same k-th largest value as the reference
    for name in ("select_25M_fp32_cold/torch", "select_12M_fp64_cold/torch", "select_bert_base_global/torch"):
        base = cases[name]["baselines"]
        kth = next(v for n, v in base.items() if "kthvalue" in n)().values
        topk_min = next(v for n, v in base.items() if "topk" in n)().values.min()
        assert torch.equal(kth.reshape(()), topk_min.reshape(())), name
    # one_read reads every tensor of the case
    assert len(cases["select_resnet50_batched/torch"]["baselines"]["one_read"]()) == cases["select_resnet50_batched/torch"]["tensors"]
    assert len(cases["select_bert_base_global/torch"]["baselines"]["one_read"]()) == cases["select_bert_base_global/torch"]["tensors"]
    del ref


def test_the_warm_case_is_hinted_with_the_cold_threshold(monkeypatch):
    import torch

    from bise_kernels.backends import reference as ref

    select = _bench("bench_select_gpu")
    calls = []
    monkeypatch.setattr(select, "_kernel", lambda backend, kernel: (lambda *a: calls.append(a) or ref.topk_select(*a[:2])))
    cases = {c["name"]: c for c in select._single_cases(("torch",), "cpu", 1e-4)}
    cases["select_25M_fp32_cold/torch"]["fn"]()
    cases["select_25M_fp32_warm/torch"]["fn"]()
    (cold_x,), k, cold_hint = calls[0]
    (warm_x,), _, warm_hint = calls[1]
    assert cold_hint is None and warm_hint is not None and not torch.equal(cold_x, warm_x)
    assert torch.equal(warm_hint, ref.topk_select([cold_x], k)[0])


def test_a_select_case_whose_kernel_is_wrong_fails_its_check(monkeypatch):
    import torch

    from bise_kernels.backends import reference as ref

    select = _bench("bench_select_gpu")

    def wrong(*args):
        thr, cut = ref.topk_select(*args[:2]) if len(args) and isinstance(args[1], int) else (None, None)
        return thr + 1, cut

    monkeypatch.setattr(select, "_kernel", lambda backend, kernel: wrong)
    for case in select._single_cases(("torch",), "cpu", 1e-4) + select._global_cases(("torch",), "cpu", 1e-4):
        if case["name"].endswith("/torch"):
            with pytest.raises(AssertionError):
                case["check"]()
    del torch


def test_cuda_bracket_runs_the_bracket_algorithm(monkeypatch):
    import os

    select = _bench("bench_select_gpu")
    monkeypatch.delenv("BISE_SELECT_CUDA", raising=False)
    monkeypatch.setattr(select, "kernel_table", lambda name: {"topk_select": lambda: os.environ.get("BISE_SELECT_CUDA")})
    assert select._kernel("cuda-bracket", "topk_select")() == "bracket"
    assert select._kernel("cuda", "topk_select")() == "radix"
    assert "BISE_SELECT_CUDA" not in os.environ


def test_the_float64_and_keep_mask_cases_run_on_both_cuda_algorithms(monkeypatch):
    select = _bench("bench_select_gpu")
    got = {}
    monkeypatch.setattr(select.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(select, "_single_cases", lambda backends, *a, dtype=None, warm=True: got.setdefault(
        f"single-{dtype}", backends) and [])
    monkeypatch.setattr(select, "_batched_cases", lambda backends, *a: got.setdefault("batched", backends) and [])
    monkeypatch.setattr(select, "_global_cases", lambda backends, *a: got.setdefault("global", backends) and [])
    monkeypatch.setattr(select, "_keep_mask_cases", lambda backends, *a: got.setdefault("keep", backends) and [])
    select.gpu_cases(dry_run=False)
    assert got["single-torch.float64"] == got["keep"] == ("cuda", "cuda-bracket")
    assert got["single-None"] == got["batched"] == got["global"] == ("cuda", "cuda-bracket", "triton")


def test_the_model_shapes_are_the_documented_models():
    shapes = _load("model_shapes")
    resnet = shapes.resnet50_weight_shapes()
    bert = shapes.bert_base_weight_shapes()
    numel = lambda ss: sum(__import__("math").prod(s) for s in ss)  # noqa: E731
    assert len(resnet) == 54 and round(numel(resnet) / 1e6, 1) == 25.5  # torchvision's 25.5 M parameters, less BN
    assert len(bert) == 76 and 108e6 < numel(bert) < 111e6


# ----------------------------------------------------------------------------- audit: the masked cases


def _masked_cases(monkeypatch=None, table=None):
    masked = _bench("bench_masked_gpu")
    if table is not None:
        monkeypatch.setattr(masked, "kernel_table", table)
    return masked, {c["name"]: c for c in masked.gpu_cases(dry_run=True)}


def _close(a, b, rel=2e-2):
    import torch

    return float((a.float() - b.float()).abs().max()) <= rel * float(b.float().abs().max()) + 1e-6 and a.shape == b.shape \
        if isinstance(a, torch.Tensor) else False


def test_masked_baselines_compute_what_their_names_say():
    """materialise-then-cuBLAS/cuDNN does the masked op's math (so its time is the fair two-pass cost);
    the dense baselines do the unmasked op."""
    import torch

    _, cases = _masked_cases()
    fwd = cases["masked_linear_fwd_bf16_64/torch"]
    assert _close(fwd["baselines"]["materialise_then_cublas"](), fwd["fn"]())
    assert not _close(fwd["baselines"]["cublas_dense"](), fwd["fn"]())
    wgrad = cases["masked_linear_wgrad_scoregrad_bf16_64/torch"]
    assert _close(wgrad["baselines"]["materialise_then_cublas"](), wgrad["fn"]()[3])
    dgrad = cases["masked_linear_dgrad_bf16_64/torch"]
    assert _close(dgrad["baselines"]["materialise_then_cublas"](), dgrad["fn"]()[0])
    step = cases["masked_linear_keep_fwd_bwd_bf16_M16_64x64/torch"]
    y, (gx, _, _, gs) = step["fn"]()
    got = step["baselines"]["materialise_then_cublas"]()
    assert len(got) == 3 and _close(got[0], y) and _close(got[1], gx) and _close(got[2], gs)
    for name, case in cases.items():
        if name.startswith("masked_conv_fwd_bwd") and name.endswith("/torch"):
            y, (gx, _, _, gs) = case["fn"]()
            gx_m, gs_m = case["baselines"]["materialise_then_cudnn"]()
            assert _close(gx_m, gx) and _close(gs_m, gs), name
            dense = case["baselines"]["cudnn_dense"]()
            assert len(dense) == 3 and dense[1].shape == gs.shape and not _close(dense[0], gx), name
        if name.startswith("channel_gate_fwd"):
            assert set(case["baselines"]) == {"eager_x_mul_g"}, name
        if name.startswith("masked_conv_keep_fwd_bwd"):
            assert set(case["baselines"]) == {"cudnn_dense", "selection_path"}, name
    del torch


def test_masked_targets_are_the_documented_ones():
    masked, cases = _masked_cases()
    for name, case in cases.items():
        want = None
        if name.startswith(("masked_linear_fwd_bf16_64/", "masked_linear_dgrad", "masked_linear_wgrad",
                            "masked_linear_keep_fwd_bf16_64/", "masked_linear_keep_dgrad", "masked_linear_keep_wgrad")):
            want = {"cublas_dense": 0.9}
        elif "_M16_" in name:  # the dry run has no max-autotune baseline
            want = {"materialise_then_cublas": 1.3}
        elif name.startswith("masked_conv"):
            want = {"cudnn_dense": 0.95}
        assert case.get("target_speedup") == want, name
    d = masked._linear_data(masked.TINY, "cpu")
    (small,) = masked._small_m_cases("p", lambda a: None, d, lambda *a: None, mask_bytes=4)
    assert small["target_speedup"] == {"materialise_then_cublas": 1.3, "compile_max_autotune": 1.0}


def test_a_masked_case_whose_kernel_is_wrong_fails_its_check(monkeypatch):
    """Every backend case's check compares with the reference: a kernel off by 50% must not be timed."""
    import torch

    from bise_kernels.backends import kernel_table

    def scaled(f):
        def wrong(*args):
            out = f(*args)
            if isinstance(out, (tuple, list)):
                return type(out)(None if o is None else o * 1.5 for o in out)
            return out * 1.5
        return wrong

    def table(name):
        real = kernel_table(name)
        return {k: (scaled(f) if k.startswith(("masked_", "channel_gate_")) else f) for k, f in real.items()}

    _, cases = _masked_cases(monkeypatch, table)
    for name, case in cases.items():
        if name.endswith("/torch"):
            with pytest.raises(AssertionError):
                case["check"]()
    del torch


def test_a_conv_keep_case_checks_its_own_keep_kernels(monkeypatch):
    from bise_kernels.backends import kernel_table

    def table(name):
        real = dict(kernel_table(name))
        fwd = real["masked_conv2d_keep_forward"]
        real["masked_conv2d_keep_forward"] = lambda *a: fwd(*a) * 1.5
        return real

    _, cases = _masked_cases(monkeypatch, table)
    keep = [c for n, c in cases.items() if n.startswith("masked_conv_keep") and n.endswith("/torch")]
    assert keep
    for case in keep:
        with pytest.raises(AssertionError):
            case["check"]()


def test_a_masked_backend_that_is_unavailable_is_recorded_as_skipped(monkeypatch):
    from bise_kernels.backends import BackendUnavailableError, kernel_table

    calls = []

    def table(name):
        calls.append(name)
        if len(calls) == 1:
            raise BackendUnavailableError("no such device")
        return kernel_table(name)

    _, cases = _masked_cases(monkeypatch, table)
    torch_cases = [c for n, c in cases.items() if n.endswith("/torch")]
    assert torch_cases and all("unavailable" in c.get("skip", "") for c in torch_cases)


# ----------------------------------------------------------------------------- audit: the training-step cases


def test_step_targets_are_the_documented_ratios():
    cases = {c["name"]: c for c in _bench("bench_step_gpu").gpu_cases(dry_run=True)}
    assert cases["step_mlp4x64_bf16_b8/auto"]["target_speedup"] == pytest.approx({"dense_step": 1 / 1.1,
                                                                                 "edge_popup": 3.0})
    for path in ("api", "module"):
        assert cases[f"overhead_masked_linear_256_b32/{path}"]["target_speedup"] == pytest.approx(
            {"dense_fwd_bwd": 1 / 1.5, "materialise_fwd_bwd": 1.0})
    assert cases["step_mlp4x64_bf16_b8/torch+keep"]["target_speedup"] == pytest.approx({"dense_step": 1 / 1.1})


def test_every_step_case_runs_the_step_check(monkeypatch):
    step = _bench("bench_step_gpu")
    checked = []
    monkeypatch.setattr(step, "_check_step", lambda net, x, backend: checked.append(backend))
    cases = [c for c in step.gpu_cases(dry_run=True) if c["name"].startswith("step_") and "skip" not in c]
    for case in cases:
        case["check"]()
    assert len(checked) == len(cases) and set(checked) == {"torch", "auto"}


def test_the_step_check_compares_the_backend_with_the_reference(monkeypatch):
    """_check_step runs the net on the backend and on "torch": a step whose loss or whose gradients
    depend on the backend fails it."""
    import torch

    import bise_kernels

    step = _bench("bench_step_gpu")

    def backend_factor():
        return 2.0 if bise_kernels.get_backend() == "cpp" else 1.0

    class LossDiffers(torch.autograd.Function):
        @staticmethod
        def forward(ctx, p):
            return p * backend_factor()

        @staticmethod
        def backward(ctx, g):
            return torch.ones_like(g)

    class GradDiffers(torch.autograd.Function):
        @staticmethod
        def forward(ctx, p):
            return p.clone()

        @staticmethod
        def backward(ctx, g):
            return torch.ones_like(g) * backend_factor()

    class Net(torch.nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.p, self.fn = torch.nn.Parameter(torch.ones(4)), fn

        def forward(self, x):
            return self.fn.apply(self.p)

    before = bise_kernels.get_backend()
    x = torch.zeros(1)
    for fn in (LossDiffers, GradDiffers):
        with pytest.raises(AssertionError):
            step._check_step(Net(fn), x, "cpp")
        assert bise_kernels.get_backend() == before
    step._check_step(Net(GradDiffers), x, "torch")  # the same backend passes


def test_a_step_updates_only_the_trainable_parameters_and_the_keep_step_compares_modes(monkeypatch):
    import torch

    step = _bench("bench_step_gpu")
    torch.manual_seed(0)
    dense = step._mlp(8, "cpu")
    popup = step._variant(dense, "edge_popup")
    assert all(not layer.dense.weight.requires_grad for layer in popup if isinstance(layer, step._EdgePopup))
    step._step_fn(popup, torch.randn(4, 8, dtype=torch.bfloat16))()
    assert all(layer.scores.grad is not None and layer.dense.weight.grad is None
               for layer in popup if isinstance(layer, step._EdgePopup))  # straight through to the scores only
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    weight = net[0].weight.detach().clone()
    step._step_fn(net, torch.randn(2, 4))()
    assert not torch.equal(weight, net[0].weight)  # the step steps
    keep = step._variant(dense, "masked_keep")
    assert all(layer.mask_mode == "keep" for layer in keep if hasattr(layer, "mask_mode"))
    kinds = []
    real = step._variant
    monkeypatch.setattr(step, "_variant", lambda d, kind: kinds.append(kind) or real(d, kind))
    step._keep_step_case("s", dense, torch.randn(4, 8, dtype=torch.bfloat16), "torch", {})
    assert kinds == ["masked_keep", "masked", "dense"]


def test_the_workflow_cases_time_the_cached_path_beside_the_plain_one():
    cases = {c["name"]: c for c in _bench("bench_workflow_gpu").gpu_cases(dry_run=True)}
    assert cases["workflow_vanilla_step/simple-cnn"]["target_us"] == 2000.0
    epoch = cases["workflow_mask_epoch/simple-cnn"]
    assert epoch["target_us"] == 300_000.0
    plain = epoch["baselines"]["straightforward epoch"].__self__
    cells = dict(zip(epoch["fn"].__code__.co_freevars, (c.cell_contents for c in epoch["fn"].__closure__)))
    cached = cells["fn"].__self__
    assert plain.prefix is None and cached.prefix is not None


# ----------------------------------------------------------------------------- audit: the README's rows


def test_the_readme_row_shows_overhead_skipped_cases_and_target_directions():
    render = _load("render_results").render
    cases = [{"name": "sel/api", "median_us": 30.0, "p20_us": 29.0, "p80_us": 31.0, "overhead_us": 4.5,
              "target_overhead_us": 10.0, "target_speedup": {"dense": 0.9}, "meets_target": True,
              "speedup": {"raw_kernel": 0.85}, "baselines": {}},
             {"name": "masked/triton", "skipped": "suite budget of 220 s spent"}]
    lines = render([{"gpu": "g", "commit": "c", "cases": cases}]).splitlines()
    assert "overhead 4.5" in lines[2] and "dense >= 0.90x" in lines[2] and "met" in lines[2]
    assert "raw_kernel 0.85x" in lines[2]
    assert len(lines) == 4 and "masked/triton" in lines[3] and "budget" in lines[3]


# ----------------------------------------------------------------------------- audit: the kernels call


def test_the_kernels_call_hands_the_suite_out_and_a_budget_within_the_deadline(tmp_path):
    import subprocess

    out = tmp_path / "out"
    env = _stub_env(tmp_path, DEADLINE_S="40", S_IMPORT="0", S_BUILD="0", S_OTHER="0")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "device_session.sh"), "kernels", str(out)], env=env,
                          capture_output=True, text=True, timeout=60)
    calls = [c for c in (tmp_path / "stub.log").read_text().splitlines() if "gpu_suite.py --out" in c]
    assert len(calls) == 1, done.stdout
    args = calls[0].split("gpu_suite.py", 1)[1].split()
    assert args[args.index("--out") + 1] == str(out)
    budget, case = (float(args[args.index(o) + 1]) for o in ("--budget-s", "--case-timeout-s"))
    # a case started at the budget's end runs its case limit: both within what is left of DEADLINE_S
    assert 0 < budget and 0 < case and budget + case <= 40, args


def test_a_call_past_its_deadline_skips_its_part_and_a_hung_import_is_cut(tmp_path):
    """A hung import (and build) of 120 s is cut at the 2 s deadline (at least 1 s a step: the workflow's
    build too): the call ends within 30 s, 3 x the slowest it took here with 4 busy processes beside it on
    2 cores (8.9 s; 2-4 s mostly), and 4 x short of the import it cut."""
    import subprocess

    for part in ("kernels", "workflow"):
        (tmp_path / part).mkdir()
        env = _stub_env(tmp_path / part, DEADLINE_S="2", S_IMPORT="120", S_BUILD="120")
        began = time.monotonic()
        done = subprocess.run(["bash", str(ROOT / "scripts" / "device_session.sh"), part, str(tmp_path / part / "out")],
                              env=env, capture_output=True, text=True, timeout=60)
        assert time.monotonic() - began < 30, (part, done.stdout)
        assert done.returncode == 6 and "no time left" in done.stdout, (part, done.stdout)
        calls = (tmp_path / part / "stub.log").read_text()
        assert "gpu_suite.py --out" not in calls and "pytest" not in calls and "gpu_workflow" not in calls
