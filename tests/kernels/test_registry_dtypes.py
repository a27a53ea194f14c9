"""A backend module's ``DTYPES``: the registry runs other dtypes on the next backend of the auto
order, or on the reference when the backend was chosen explicitly (bise_kernels/backends/__init__.py)."""

import sys
import types

import pytest
import torch

import bise_kernels as bk
from bise_kernels import backends
from bise_kernels.backends import reference as ref


@pytest.fixture
def fp32_only(monkeypatch):
    """A CPU backend "fp32only" whose topk_select takes float32 scores only, first in the auto order;
    yields the list of dtypes its kernel was called with."""
    calls = []

    def topk_select(tensors, k, hint=None):
        calls.append(tensors[0].dtype)
        return ref.topk_select(tensors, k, hint)

    module = types.ModuleType("fp32only_select")
    module.topk_select, module.KERNELS, module.DTYPES = topk_select, ("topk_select",), (torch.float32,)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(backends.BACKENDS, "fp32only", backends.Backend("fp32only", ("cpu",), (module.__name__,)))
    monkeypatch.setitem(backends.AUTO_ORDER_PER_KERNEL, ("cpu", "topk_select"), ("fp32only", "torch"))
    return calls


def test_supports_reads_the_modules_dtypes(fp32_only):
    backend = backends.BACKENDS["fp32only"]
    assert backend.supports("topk_select") and backend.supports("topk_select", torch.float32)
    assert not backend.supports("topk_select", torch.float64)
    assert not backend.supports("keep_mask", torch.float32)
    assert backends.BACKENDS["torch"].supports("topk_select", torch.float64)  # no DTYPES: every dtype


@pytest.mark.parametrize("choice", ["auto", "fp32only"])
def test_other_dtypes_run_on_the_next_backend_or_the_reference(fp32_only, choice):
    with bk.use_backend(choice):
        assert backends.resolve("topk_select", "cpu", torch.float32)[0] == "fp32only"
        assert backends.resolve("topk_select", "cpu", torch.float64)[0] == "torch"
        for dtype in (torch.float64, torch.float32):
            scores = torch.randn(50, generator=torch.Generator().manual_seed(1)).to(dtype)
            got, want = bk.topk_select(scores, 15), ref.topk_select([scores], 15)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert fp32_only == [torch.float32]


@pytest.mark.skipif(not backends.INTERPRET, reason="the Triton select runs on CPU tensors under TRITON_INTERPRET=1")
def test_triton_select_leaves_float64_to_the_reference():
    assert not backends.BACKENDS["triton"].supports("topk_select", torch.float64)
    assert backends.BACKENDS["triton"].supports("keep_mask", torch.bfloat16)
    scores = torch.randn(40, dtype=torch.float64)
    with bk.use_backend("triton"):
        assert backends.resolve("keep_mask", "cpu", torch.float64)[0] == "torch"
        assert torch.equal(bk.topk_mask(scores, 0.25), ref.keep_mask(scores, *ref.topk_select([scores], 10)))
