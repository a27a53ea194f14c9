"""The CUDA channel-gate forward (csrc/cuda/gate.cu, ``bise_gate_forward``) on the CPU: y against
the reference bit for bit, and its fused finiteness check (BISE_DEVICE_CHECK) firing for a NaN / inf
score of the first, a middle and the last channel and for a NaN / inf thr, never for finite values.

As test_masked_cuda_emulated.py (same emulation and counting check), on the whole of gate.cu: the
backward's 2-d grids and blocks run too (emu.h), against the reference (the backward makes no check).
"""

import ctypes
import re

import pytest
import torch

from bise_kernels.backends import reference as ref
from test_masked_cuda_emulated import CODES, _message, compile_for_the_cpu
from test_select_cuda_emulated import ROOT, pytestmark  # noqa: F401 (the skip mark)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    gate = (ROOT / "csrc" / "cuda" / "gate.cu").read_text()
    # The backward's column kernel runs in 32 x 8 blocks (compile_for_the_cpu knows kThreads blocks only).
    gate, done = re.subn(r"(\w+<[^<>]*?>)<<<(\w+), dim3\(kColsX, kColsY\), 0, stream>>>\(([^;]*)\);",
                         r"emu::launch(\2, dim3(kColsX, kColsY), [&] { \1(\3); });", gate)
    assert done == 1
    lib = compile_for_the_cpu(tmp_path_factory.mktemp("gate_cuda_emu"), "gate", gate)
    lib.bise_gate_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_void_p]
    lib.bise_gate_workspace.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.bise_gate_workspace.restype = ctypes.c_int64
    lib.bise_gate_backward.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_int, ctypes.c_int] + \
        [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_void_p]
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


@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_gate_forward_cuts_the_ties_at_thr_by_channel(lib, score_dtype):
    """Channels whose score equals thr are kept iff their channel index is below cut (a cut before,
    inside and after the tied channels), bit for bit the reference."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, 5, generator=g, dtype=torch.float64 if score_dtype == torch.float64 else torch.float32)
    scores = torch.randn(9, generator=g).to(score_dtype)
    scores[::2] = 0.25
    thr = torch.tensor(0.25, dtype=score_dtype)
    for cut in (0, 3, 5, 9):
        y, failed = _gate_forward(lib, x, scores, thr, torch.tensor(cut))
        assert failed == 0
        assert torch.equal(y, ref.channel_gate_forward(x, scores, thr, torch.tensor(cut), 1)), cut


@pytest.mark.parametrize("estimator", ["ste", "sigmoid"])
@pytest.mark.parametrize("shape", [(3, 7, 40), (5, 3, 33), (3, 7, 5), (130, 40, 1), (2, 70, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_gate_backward(lib, dtype, shape, estimator):
    """bise_gate_backward over x viewed as (outer, C, inner): the row kernel (inner >= 32: a block per
    (channel, outer chunk), 2-d grid) and the column kernel (inner < 32: 32 x 8 blocks, several column
    blocks and outer chunks), then the per-channel finish: grad_x bit for bit (ties at thr split by
    the cut), grad_scores as the reference's; grad_x skipped when not asked."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g).to(dtype)
    gy = torch.randn(*shape, generator=g).to(dtype)
    channels = shape[1]
    score_dtype = torch.float16 if dtype == torch.bfloat16 else dtype
    scores = torch.randn(channels, generator=g).to(score_dtype)
    scores[::3] = 0.25
    thr, cut = torch.tensor(0.25, dtype=score_dtype), torch.tensor(channels // 2)
    temperature = 0.5
    want_gx, want_gs = ref.channel_gate_backward(gy, x, scores, thr, cut, 1, estimator, temperature, (True, True))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    outer, inner = shape[0], shape[2]
    for need_x in (True, False):
        workspace = torch.full((lib.bise_gate_workspace(outer, channels, inner),), float("nan"), dtype=acc)
        gx = torch.full_like(x, 7.0)
        gs = torch.empty_like(scores)
        status = lib.bise_gate_backward(gy.data_ptr(), x.data_ptr(), gx.data_ptr() if need_x else None, gs.data_ptr(),
                                        workspace.data_ptr(), scores.data_ptr(), outer, channels, inner, CODES[dtype],
                                        CODES[score_dtype], thr.data_ptr(), cut.data_ptr(),
                                        int(estimator == "sigmoid"), temperature, None)
        assert status == 0
        assert torch.equal(gx, want_gx if need_x else torch.full_like(x, 7.0)), need_x
        torch.testing.assert_close(gs, want_gs)
