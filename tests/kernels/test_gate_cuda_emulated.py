"""The CUDA channel-gate forward (csrc/cuda/gate.cu, ``bise_gate_forward``) on the CPU: y against
the reference bit for bit, and its fused finiteness check (BISE_DEVICE_CHECK) firing for a NaN / inf
score of the first, a middle and the last channel and for a NaN / inf thr, never for finite values.

As test_masked_cuda_emulated.py (same emulation and counting check), on gate.cu up to its backward
launcher, whose 2-d blocks the emulation does not run (the backward makes no check).
"""

import ctypes

import pytest
import torch

from bise_kernels.backends import reference as ref
from test_masked_cuda_emulated import CODES, _message, compile_for_the_cpu
from test_select_cuda_emulated import ROOT, pytestmark  # noqa: F401 (the skip mark)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    gate = (ROOT / "csrc" / "cuda" / "gate.cu").read_text()
    forward_only = gate[:gate.index('extern "C" cudaError_t bise_gate_backward(')]
    lib = compile_for_the_cpu(tmp_path_factory.mktemp("gate_cuda_emu"), "gate", forward_only)
    lib.bise_gate_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_void_p]
    return lib


def _gate_forward(lib, x, scores, thr, cut):
    """(y, failed checks) of one bise_gate_forward call over x viewed as (outer, C, inner), C = dim 1."""
    failed = ctypes.c_int.in_dll(lib, "emu_failed_checks")
    failed.value = 0
    y = torch.empty_like(x)
    outer, channels, inner = x.shape[0], x.shape[1], x[0, 0].numel()
    status = lib.bise_gate_forward(x.data_ptr(), y.data_ptr(), scores.data_ptr(), outer, channels, inner,
                                   CODES[x.dtype], CODES[scores.dtype], thr.data_ptr(), cut.data_ptr(), None)
    assert status == 0
    return y, failed.value


@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gate_forward_and_its_finiteness_check(lib, score_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g, dtype=torch.float64 if score_dtype == torch.float64 else torch.float32)
    scores = torch.randn(7, generator=g).to(score_dtype)
    thr, cut = torch.tensor(0.1, dtype=score_dtype), torch.tensor(3)
    y, failed = _gate_forward(lib, x, scores, thr, cut)
    assert failed == 0
    assert torch.equal(y, ref.channel_gate_forward(x, scores, thr, cut, 1))
    for channel in (0, 3, 6):
        for bad in (float("nan"), float("inf"), float("-inf")):
            s = scores.clone()
            s[channel] = bad
            assert _gate_forward(lib, x, s, thr, cut)[1] == x[:, 0].numel(), (channel, bad)  # per element read
            assert _message(lib).startswith("scores contains non-finite values")
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert _gate_forward(lib, x, scores, torch.tensor(bad, dtype=score_dtype), cut)[1] > 0
        assert _message(lib).startswith("threshold contains non-finite values")
