"""The backend registry: auto falls back, explicit choices fail loudly, the env var is honoured."""

import os
import subprocess
import sys

import pytest
import torch

import bise_kernels as bk
from bise_kernels import backends


def test_reference_backend_is_always_available():
    assert "torch" in bk.available_backends("cpu")
    assert bk.why_unavailable("torch") is None


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        bk.set_backend("fastest")


def test_explicit_backend_for_another_device_raises():
    scores = torch.randn(8)
    with bk.use_backend("cuda"):
        with pytest.raises(bk.BackendUnavailableError, match="'cuda' does not run on 'cpu'"):
            bk.topk_mask(scores, 0.5)


def test_auto_resolves_to_an_available_backend():
    with bk.use_backend("auto"):
        name, fn = backends.resolve("topk_select", "cpu")
    assert name in bk.available_backends("cpu") and callable(fn)


def test_use_backend_restores_previous_choice():
    before = bk.get_backend()
    with bk.use_backend("torch"):
        assert bk.get_backend() == "torch"
    assert bk.get_backend() == before


def test_environment_variable_selects_backend():
    code = "import bise_kernels as bk; print(bk.get_backend())"
    env = dict(os.environ, BISE_KERNELS_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"


def test_broken_backend_module_makes_backend_unavailable_with_reason():
    broken = backends.Backend("broken", ("cpu",), ("bise_kernels.backends.does_not_exist",))
    assert not broken.runs_on("cpu")
    assert "does_not_exist" in broken.why_unavailable


def test_bogus_environment_variable_is_a_named_error_at_the_first_op(monkeypatch):
    monkeypatch.setenv("BISE_KERNELS_BACKEND", "bogus")
    monkeypatch.setattr(backends, "_default", None)  # as in a fresh process: the variable is read at first use
    with pytest.raises(ValueError, match=r"BISE_KERNELS_BACKEND must be one of \['auto', 'torch'.*got 'bogus'"):
        bk.topk_mask(torch.randn(8), 0.5)


def test_an_empty_environment_variable_means_auto(monkeypatch):
    """``BISE_KERNELS_BACKEND=`` (set, empty: how a shell unsets it for one command) was a ValueError at
    every op."""
    monkeypatch.setenv("BISE_KERNELS_BACKEND", "")
    monkeypatch.setattr(backends, "_default", None)
    assert bk.get_backend() == "auto"
    assert int(bk.topk_mask(torch.randn(8), 0.5).sum()) == 4


def test_a_backend_on_a_device_it_does_not_run_on_says_where_it_runs(monkeypatch):
    monkeypatch.setitem(backends.BACKENDS, "gpu_only", backends.Backend("gpu_only", ("cuda",), ()))
    with bk.use_backend("gpu_only"), pytest.raises(bk.BackendUnavailableError,
                                                   match=r"'gpu_only' does not run on 'cpu' tensors; it runs on "
                                                         r"\('cuda',\)"):
        bk.topk_mask(torch.randn(8), 0.5)


@pytest.mark.parametrize("op", ["linear", "conv2d", "gate"])
def test_backward_in_another_thread_runs_on_the_forward_backend(monkeypatch, op):
    """Autograd runs a CUDA backward in a device thread of its own, where the caller's per-thread
    use_backend does not hold: the backward must still run on the backend the forward ran on."""
    import threading

    resolved = []
    real = backends.resolve
    monkeypatch.setattr(backends, "resolve",
                        lambda kernel, *args: resolved.append((kernel, backends.get_backend())) or real(kernel, *args))
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    scores = torch.randn(4, requires_grad=True)
    with bk.use_backend("torch"):
        if op == "linear":
            y = bk.masked_linear(torch.randn(2, 2), w.detach()[:, :2, 0, 0].clone().requires_grad_(), None,
                                 scores, density=0.5)
        elif op == "conv2d":
            y = bk.masked_conv2d(torch.randn(1, 3, 5, 5), w, None, scores, density=0.5)
        else:
            y = bk.channel_gate(torch.randn(2, 4, 3), scores, threshold=0.0)
    errors = []

    def backward():
        try:
            y.sum().backward()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=backward)
    thread.start()
    thread.join()
    assert not errors, errors
    assert scores.grad is not None
    backward_kernels = [(k, b) for k, b in resolved if k.endswith("_backward")]
    assert backward_kernels and all(b == "torch" for _, b in backward_kernels), resolved


@pytest.mark.parametrize("write", ["setitem", "delitem", "ior", "clear", "pop", "popitem", "setdefault", "update"])
def test_every_write_to_a_registry_table_forgets_the_finiteness_answers(write):
    """checks_finite caches its answers; the registry tables decide them, so every dict write to one
    (tests and users register backends and orders) must clear that cache."""
    table = backends.AUTO_ORDER_PER_KERNEL
    saved = dict(table)
    try:
        backends.checks_finite("topk_select", "cpu", torch.float32)
        assert backends._FINITE_ANSWERS
        key = ("cpu", "made_up_kernel")
        {
            "setitem": lambda: table.__setitem__(key, ("torch",)),
            "delitem": lambda: (dict.__setitem__(table, key, ("torch",)), table.__delitem__(key)),
            "ior": lambda: table.__ior__({key: ("torch",)}),
            "clear": table.clear,
            "pop": lambda: (dict.__setitem__(table, key, ("torch",)), table.pop(key)),
            "popitem": lambda: (dict.__setitem__(table, key, ("torch",)), table.popitem()),
            "setdefault": lambda: table.setdefault(key, ("torch",)),
            "update": lambda: table.update({key: ("torch",)}),
        }[write]()
        assert not backends._FINITE_ANSWERS, write
    finally:
        dict.clear(table)
        dict.update(table, saved)
        backends._FINITE_ANSWERS.clear()


def test_a_cause_shared_by_a_backends_modules_is_logged_once(tmp_path, monkeypatch, caplog):
    """Without bise_kernels._C both cpp modules fail with the same ImportError: one log line, the cause once."""
    for name in ("_bk_broken_a", "_bk_broken_b"):
        (tmp_path / f"{name}.py").write_text("raise ImportError('no _C here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    two = backends.Backend("two", ("cpu",), ("_bk_broken_a", "_bk_broken_b"))
    with caplog.at_level("WARNING", logger="bise_kernels"):
        assert not two.runs_on("cpu")
    assert two.why_unavailable == "_bk_broken_a, _bk_broken_b: ImportError: no _C here"
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"bise_kernels: backend 'two' unavailable ({two.why_unavailable})"]


def test_a_missing_extension_says_how_to_rebuild_it(monkeypatch):
    """In a checkout: the editable install; installed (no setup.py beside the package, as in site-packages):
    a reinstall that makes a failed build an error (pip skips it without a word otherwise)."""
    from bise_kernels import _extension

    pytest.importorskip("bise_kernels._C")
    assert _extension.rebuild_hint().endswith(f"pip install --no-build-isolation -e {_extension.SETUP.parent}`")
    monkeypatch.setattr(_extension, "SETUP", _extension.SETUP.parent / "site-packages" / "setup.py")
    monkeypatch.delattr(bk, "_C")
    monkeypatch.setitem(sys.modules, "bise_kernels._C", None)  # as if never built
    _extension.ext_ops.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"^the compiled extension bise_kernels._C was not built; reinstall with "
                                              r"`BISE_KERNELS_BUILD_CPP=1 pip install --no-build-isolation --force-reinstall"):
            _extension.ext_ops()
    finally:
        _extension.ext_ops.cache_clear()




def test_set_backend_inside_use_backend_takes_effect_at_once():
    before = backends._default
    try:
        with bk.use_backend("torch"):
            bk.set_backend("cpp" if "cpp" in bk.available_backends("cpu") else "torch")
            assert bk.get_backend() == backends._default
    finally:
        backends._default = before


def test_nested_use_backend_restores_the_outer_choice():
    with bk.use_backend("torch"):
        with bk.use_backend("auto"):
            assert bk.get_backend() == "auto"
        assert bk.get_backend() == "torch"


def test_an_explicit_backend_whose_modules_failed_raises(monkeypatch):
    broken = backends.Backend("broken", ("cpu",), ("bise_kernels.backends.does_not_exist",))
    monkeypatch.setitem(backends.BACKENDS, "broken", broken)
    with bk.use_backend("broken"), pytest.raises(bk.BackendUnavailableError, match="'broken' is unavailable"):
        bk.topk_mask(torch.randn(8), 0.5)
    with pytest.raises(bk.BackendUnavailableError, match="'broken' is unavailable"):
        backends.kernel_table("broken")


def test_triton_runs_on_cpu_tensors_only_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(backends, "INTERPRET", False)
    assert backends._triton_devices() == ("cuda",)
    monkeypatch.setattr(backends, "INTERPRET", True)
    assert backends._triton_devices() == ("cuda", "cpu")


def test_a_non_string_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        bk.set_backend(["cpp"])


def test_the_cuda_backend_needs_an_extension_built_with_cuda():
    from bise_kernels import _extension

    _C = pytest.importorskip("bise_kernels._C")
    if getattr(_C, "WITH_CUDA", False):
        _extension.require_cuda_kernels()
    else:
        with pytest.raises(ImportError, match="built without its CUDA kernels"):
            _extension.require_cuda_kernels()
