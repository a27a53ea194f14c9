"""``python -m bise_kernels`` (bise_kernels/info.py): runs, names every backend and why one is
unavailable, and says which backend each kernel resolves to under the setting in effect."""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import bise_kernels
from bise_kernels import backends, info

ROOT = Path(__file__).resolve().parents[2]


def run_module(*args, **env):
    """``python -m bise_kernels *args`` from the repository root with ``env`` (None: unset) over ours."""
    environ = dict(os.environ)
    for name, value in env.items():
        environ.pop(name, None) if value is None else environ.__setitem__(name, value)
    done = subprocess.run([sys.executable, "-m", "bise_kernels", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_text_report_names_every_backend_and_kernel():
    out = run_module(BISE_KERNELS_BACKEND=None)
    assert f"bise_kernels {bise_kernels.__version__}" in out
    for name in backends.BACKENDS:
        assert re.search(rf"^  {name} +(available on|unavailable: )", out, re.M), name
    for kernel in backends.kernel_table("torch"):
        assert re.search(rf"^  {kernel} ", out, re.M), kernel
    assert "backend setting: auto" in out
    # the CPU kind (float results of matrix products repeat bit for bit on one kind only)
    assert f"({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} CPUs" in out


def test_json_with_env_backend_torch_resolves_every_kernel_to_torch():
    report = json.loads(run_module("--json", BISE_KERNELS_BACKEND="torch"))
    assert report["backend_setting"] == "torch"
    assert report["environment"][backends.ENV_VARIABLE] == "torch"
    assert set(report["backends"]) == set(backends.BACKENDS)
    assert all(isinstance(b["available"], bool) for b in report["backends"].values())
    assert report["backends"]["torch"]["available"] is True
    cells = [cell for device in report["resolution"].values() for kernel in device.values() for cell in kernel.values()]
    assert cells and set(cells) == {"torch"}
    assert set(report["resolution"]) == set(report["devices"]) >= {"cpu"}


def test_auto_resolves_cpu_kernels_to_cpp_with_the_extension():
    pytest.importorskip("bise_kernels._C")
    with bise_kernels.use_backend("auto"):
        report = info.collect()
    assert report["extension"]["loaded"] is True and report["extension"]["error"] is None
    assert report["backends"]["cpp"]["available"] is True
    assert report["resolution"]["cpu"]["topk_select"]["float32"] == "cpp"
    assert report["resolution"]["cpu"]["masked_linear_forward"]["float32"] == "cpp"


def test_unavailable_backend_shows_its_reason(monkeypatch):
    broken = backends.Backend("broken", ("cpu",), ("bise_kernels.no_such_module",))
    monkeypatch.setitem(backends.BACKENDS, "broken", broken)
    report = info.collect()
    broken = report["backends"]["broken"]
    assert broken["available"] is False and broken["runs_here_on"] == []
    assert "bise_kernels.no_such_module" in broken["why_unavailable"]
    assert "ModuleNotFoundError" in broken["why_unavailable"]
    assert "unavailable: bise_kernels.no_such_module" in info.format_text(report)


def test_partly_importable_backend_shows_what_failed(monkeypatch):
    partly = backends.Backend("partly", ("cpu",), ("bise_kernels.backends.reference", "bise_kernels.no_such_module"))
    monkeypatch.setitem(backends.BACKENDS, "partly", partly)
    report = info.collect()
    assert report["backends"]["partly"]["available"] is True
    assert "bise_kernels.no_such_module: ModuleNotFoundError" in report["backends"]["partly"]["import_errors"]
    assert report["backends"]["torch"]["import_errors"] is None
    assert "partly: bise_kernels.no_such_module" in info.format_text(report)


def test_backend_on_no_present_device_says_where_it_runs(monkeypatch):
    elsewhere = backends.Backend("elsewhere", ("mps",), ("bise_kernels.backends.reference",))
    monkeypatch.setitem(backends.BACKENDS, "elsewhere", elsewhere)
    elsewhere = info.collect()["backends"]["elsewhere"]
    assert elsewhere["available"] is False
    assert elsewhere["why_unavailable"].startswith("runs on mps; present here: cpu")


def test_failing_probes_are_reported_not_raised(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("probe broke")

    monkeypatch.setattr(backends, "resolve", fail)
    monkeypatch.setattr(backends, "present_devices", fail)
    monkeypatch.setattr(backends, "why_unavailable", fail)
    monkeypatch.setattr(bise_kernels._extension, "ext_ops", fail)
    report = info.collect()
    assert report["devices"] == ["cpu"]
    assert report["resolution"]["cpu"]["topk_select"]["float32"] == "error: RuntimeError: probe broke"
    assert report["backends"]["torch"] == {"available": False, "why_unavailable": "error: RuntimeError: probe broke",
                                           "devices": list(backends.BACKENDS["torch"].devices), "runs_here_on": [],
                                           "kernels": [], "import_errors": None}
    assert report["extension"]["loaded"] is False and "probe broke" in report["extension"]["error"]
    assert report["extension"]["hint"] == bise_kernels._extension.rebuild_hint()
    text = info.format_text(report)
    assert "error [1]" in text and "[1] RuntimeError: probe broke" in text
    json.dumps(report)


def test_source_commit_is_this_checkout_or_bise_commit_or_unknown(monkeypatch, tmp_path):
    """What benchmark and result files record: this checkout's HEAD, $BISE_COMMIT over it, and "unknown" for a
    copy of the package that is not the top of a git checkout (installed into a venv inside some repository)."""
    monkeypatch.delenv("BISE_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    found = info.source_commit()
    assert found["commit"] == head.stdout.strip() and isinstance(found["dirty"], bool)
    assert found["commit"] in run_module()
    monkeypatch.setenv("BISE_COMMIT", "abc1234")
    assert info.source_commit() == {"commit": "abc1234", "dirty": None}
    monkeypatch.delenv("BISE_COMMIT")
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=repo, check=True)
    for package in (repo / "venv" / "bise_kernels", tmp_path / "plain" / "bise_kernels"):
        monkeypatch.setattr(bise_kernels, "__file__", str(package / "__init__.py"))
        package.mkdir(parents=True)
        assert info.source_commit() == {"commit": "unknown", "dirty": None}, package


def test_environment_lists_every_variable_the_package_reads():
    read = {backends.ENV_VARIABLE}
    for path in (ROOT / "bise_kernels").rglob("*.py"):
        read |= set(re.findall(r"environ(?:\.get\(|\[)\s*[\"']([A-Z0-9_]+)", path.read_text()))
    for path in (ROOT / "csrc").rglob("*.*"):
        read |= set(re.findall(r"getenv\(\s*\"([A-Z0-9_]+)", path.read_text()))
    assert {"TRITON_INTERPRET", "BISE_KERNELS_AUTOTUNE", "BISE_SELECT_CUDA"} <= read  # the search finds them
    assert read <= set(info.ENVIRONMENT), read - set(info.ENVIRONMENT)


def test_extension_outside_the_package_is_flagged():
    report = info.collect()
    report["extension"]["file"] = "/elsewhere/bise_kernels/_C.so"
    assert "_C.so (NOT in the package directory above)" in info.format_text(report)
    report["extension"]["file"] = os.path.join(report["versions"]["bise_kernels_path"], "_C.so")
    assert "NOT in the package" not in info.format_text(report)


def test_gpu_machine_names_the_gpus_and_resolves_cuda(monkeypatch):
    """A faked CUDA device (nothing runs on it): the GPU line and a cuda column of registry names."""
    import torch

    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    with bise_kernels.use_backend("auto"):
        report = info.collect()
    assert report["versions"]["gpus"] == [{"index": 0, "name": props.name, "capability": "9.0", "memory_gib": 80.0}]
    assert report["devices"] == ["cpu", "cuda"]
    cells = {cell for kernel in report["resolution"]["cuda"].values() for cell in kernel.values()}
    assert cells <= set(backends.BACKENDS), cells
    assert "GPUs: 0: NVIDIA H100 80GB HBM3 (sm 9.0, 80.0 GiB)" in info.format_text(report)




def test_a_backend_running_topk_keep_mask_itself_is_not_called_composed():
    pytest.importorskip("bise_kernels._C")
    with bise_kernels.use_backend("cpp"):
        assert info._runs("topk_keep_mask", "cpu", torch.float32) == "cpp"
    with bise_kernels.use_backend("torch"):
        assert info._runs("topk_keep_mask", "cpu", torch.float32) == "torch"


def test_a_table_cell_names_the_float32_backend_then_the_dtypes_that_differ():
    errors = []
    cell = info._cell({"float32": "triton", "float16": "triton", "bfloat16": "triton", "float64": "torch"}, errors)
    assert cell == "triton (float64: torch)"
    same = "error: RuntimeError: x"
    for _ in range(2):  # one error shown in two cells is listed once
        assert info._cell({d: same for d in info.DTYPES}, errors) == "error [1]"
    assert errors == [same]


def test_dirty_means_tracked_files_changed_and_is_shown(monkeypatch, tmp_path):
    monkeypatch.delenv("BISE_COMMIT", raising=False)
    package = tmp_path / "bise_kernels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path,  # noqa: E731
                                    check=True, capture_output=True)
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "x")
    monkeypatch.setattr(bise_kernels, "__file__", str(package / "__init__.py"))
    (tmp_path / "untracked.txt").write_text("x")
    assert info.source_commit()["dirty"] is False
    (package / "__init__.py").write_text("# changed")
    found = info.source_commit()
    assert found["dirty"] is True
    report = info.collect()
    report["versions"]["bise_kernels_commit"] = found
    assert f"commit {found['commit']}, with uncommitted changes" in info.format_text(report)


def test_a_cpu_without_a_model_name_line_is_described_by_the_platform(monkeypatch):
    import io

    monkeypatch.setattr(info, "open", lambda *a, **k: io.StringIO("processor\t: 0\n"), raising=False)
    assert info.cpu_description().startswith(info.platform.processor() or info.platform.machine())


def test_report_says_whether_the_extension_has_cuda_kernels_and_lists_unset_variables(monkeypatch):
    _C = pytest.importorskip("bise_kernels._C")
    monkeypatch.delenv("BISE_SELECT_CUDA", raising=False)
    report = info.collect()
    assert report["extension"]["with_cuda"] is bool(getattr(_C, "WITH_CUDA", False))
    assert "BISE_SELECT_CUDA" in report["environment"] and report["environment"]["BISE_SELECT_CUDA"] is None
    assert "BISE_SELECT_CUDA unset" in info.format_text(report)
