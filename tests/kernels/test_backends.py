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
