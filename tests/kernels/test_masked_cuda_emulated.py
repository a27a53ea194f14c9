"""The CUDA mask pass (csrc/cuda/masked.cu, ``bise_masked_weight``) on the CPU: W_eff against the
reference bit for bit, and its fused finiteness check (the device-side assert BISE_DEVICE_CHECK)
firing for a NaN / inf score at the first, a middle and the last position, per weight and per
unit, and for a NaN / inf thr, and never for finite values.

No GPU is needed: masked.cu is compiled by g++ against the CUDA emulation of
select_cuda_emu/emu.h (blocks in sequence, threads as fibers) into a shared library called through
ctypes; BISE_DEVICE_CHECK counts failures there instead of stopping the kernel (emu.h). Skipped
without g++ or off Linux x86-64.
"""

import ctypes
import re
import subprocess

import pytest
import torch

from bise_kernels.backends import reference as ref
from test_select_cuda_emulated import CXX, EMU, ROOT, pytestmark  # noqa: F401 (the skip mark)

CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
CHECKS = '#include "emu.h"\n#include <string>\n'  # emu.h: BISE_DEVICE_CHECK counts failures


def _for_the_cpu(source: str) -> str:
    """masked.cu as C++ over emu.h: launches as emu::launch calls."""
    launches = source.count("<<<")
    source, done = re.subn(r"(\w+<[^<>]*?>)<<<(.+?), kThreads, 0, stream>>>\(([^;]*)\);",
                           r"emu::launch(\2, kThreads, [&] { \1(\3); });", source)
    assert done == launches, "a kernel launch the emulation does not recognise"
    return CHECKS + source + '\nint emu_failed_checks = 0;\nconst char* emu_last_message = "";\n'


def compile_for_the_cpu(build, name: str, source: str) -> ctypes.CDLL:
    """``source`` (the text of a csrc/cuda .cu file) compiled by g++ over the emulation, in ``build``."""
    (build / "stub").mkdir()
    for header in ("cuda_runtime.h", "cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h"):
        (build / "stub" / header).write_text('#pragma once\n#include "emu.h"\n#include "cuda_fp_stub.h"\n')
    cpp = build / f"{name}.cpp"
    cpp.write_text(_for_the_cpu(source))
    so = build / f"{name}.so"
    flags = ["-std=c++20", "-O1", "-shared", "-fPIC", f"-I{EMU}", f"-I{build / 'stub'}", f"-I{ROOT / 'csrc' / 'cuda'}"]
    done = subprocess.run([CXX, *flags, str(cpp), "-o", str(so)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return ctypes.CDLL(str(so))


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    source = (ROOT / "csrc" / "cuda" / "masked.cu").read_text()
    lib = compile_for_the_cpu(tmp_path_factory.mktemp("masked_cuda_emu"), "masked", source)
    lib.bise_masked_weight.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                       ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.bise_score_grad.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_void_p]
    lib.bise_keep_weight.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                     ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.bise_keep_score_grad.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                                         ctypes.c_int, ctypes.c_int, ctypes.c_double, ctypes.c_int, ctypes.c_int,
                                         ctypes.c_void_p]
    return lib


def _masked_weight(lib, weight, scores, thr, cut, check_finite=True):
    """(W_eff, failed checks) of one bise_masked_weight call."""
    failed = ctypes.c_int.in_dll(lib, "emu_failed_checks")
    failed.value = 0
    out = torch.empty_like(weight)
    per_unit = scores.shape != weight.shape
    row_len = weight[0].numel()
    status = lib.bise_masked_weight(weight.data_ptr(), scores.data_ptr(), out.data_ptr(), weight.numel(), row_len,
                                    int(per_unit), CODES[weight.dtype], CODES[scores.dtype], thr.data_ptr(),
                                    cut.data_ptr(), int(check_finite), None)
    assert status == 0
    return out, failed.value


def _message(lib) -> str:
    return ctypes.c_char_p.in_dll(lib, "emu_last_message").value.decode()


@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("per_unit", [False, True], ids=["weight", "unit"])
def test_mask_pass_and_its_finiteness_check(lib, score_dtype, per_unit):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 67, generator=g, dtype=torch.float64 if score_dtype == torch.float64 else torch.float32)
    scores = torch.randn(*((6,) if per_unit else (6, 67)), generator=g).to(score_dtype)
    thr, cut = torch.tensor(0.1, dtype=score_dtype), torch.tensor(7)
    out, failed = _masked_weight(lib, weight, scores, thr, cut)
    assert failed == 0
    keep = ref.keep_mask(scores, thr, cut)
    assert torch.equal(out, weight * (keep[:, None] if per_unit else keep).to(weight.dtype))
    for pos in (0, scores.numel() // 2, scores.numel() - 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            s = scores.clone()
            s.view(-1)[pos] = bad
            assert _masked_weight(lib, weight, s, thr, cut)[1] == 1, (pos, bad)
            assert _masked_weight(lib, weight, s, thr, cut, check_finite=False)[1] == 0
            assert _message(lib).startswith("scores contains non-finite values")
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert _masked_weight(lib, weight, scores, torch.tensor(bad, dtype=score_dtype), cut)[1] > 0
        assert _message(lib).startswith("threshold contains non-finite values")


def _tied(shape, score_dtype, g):
    """Scores of ``shape`` where every third entry equals thr = 0.25 (ties for the cut to split)."""
    scores = torch.randn(*shape, generator=g).to(score_dtype)
    scores.view(-1)[::3] = 0.25
    return scores, torch.tensor(0.25, dtype=score_dtype)


@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("per_unit", [False, True], ids=["weight", "unit"])
def test_mask_pass_cuts_the_ties_at_thr_by_flat_index(lib, score_dtype, per_unit):
    """Scores equal to thr are kept iff their flat index (the unit's, per unit) is below cut: a cut
    before, inside and after the ties, bit for bit the reference's."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(9, 67, generator=g, dtype=torch.float64 if score_dtype == torch.float64 else torch.float32)
    scores, thr = _tied((9,) if per_unit else (9, 67), score_dtype, g)
    for cut in (0, 4, scores.numel() // 2 + 1, scores.numel()):
        cut = torch.tensor(cut)
        out, failed = _masked_weight(lib, weight, scores, thr, cut)
        keep = ref.keep_mask(scores, thr, cut)
        assert failed == 0
        assert torch.equal(out, weight * (keep[:, None] if per_unit else keep).to(weight.dtype)), int(cut)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_unit", [False, True], ids=["weight", "unit"])
@pytest.mark.parametrize("estimator", ["ste", "sigmoid"])
def test_score_grad_and_keep_passes(lib, weight_dtype, per_unit, estimator):
    """The backward and keep-mask passes of masked.cu (bise_score_grad, bise_keep_weight,
    bise_keep_score_grad), which the mask-pass test above does not run: grad_w_eff masked in place
    bit for bit (ties at thr split by the cut), the score gradients (per unit: the block-reduced
    row sums over rows longer than a block) as the reference's, per need_scores / need_weight."""
    g = torch.Generator().manual_seed(2)
    score_dtype = torch.float16 if weight_dtype == torch.bfloat16 else weight_dtype
    weight = torch.randn(5, 300, generator=g).to(weight_dtype)  # rows of 300 > 256 threads
    grad = torch.randn(5, 300, generator=g).to(weight_dtype)
    scores, thr = _tied((5,) if per_unit else (5, 300), score_dtype, g)
    cut = torch.tensor(scores.numel() // 2)
    keep = ref.keep_mask(scores, thr, cut)
    keep_w = (keep[:, None] if per_unit else keep).to(weight_dtype)
    temperature, sigmoid = 0.5, int(estimator == "sigmoid")
    want_gs = ref._score_grad(grad, weight, scores, estimator, temperature)
    codes = (CODES[weight_dtype], CODES[score_dtype])
    for need_scores, need_weight in ((1, 1), (1, 0), (0, 1)):
        for mode in ("scores", "keep"):
            gw = grad.clone()
            gs = torch.full_like(scores, 7.0)
            if mode == "scores":
                status = lib.bise_score_grad(gw.data_ptr(), weight.data_ptr(), scores.data_ptr(), gs.data_ptr(),
                                             weight.numel(), 300, int(per_unit), *codes, thr.data_ptr(),
                                             cut.data_ptr(), sigmoid, temperature, need_scores, need_weight, None)
            else:
                status = lib.bise_keep_score_grad(gw.data_ptr(), weight.data_ptr(), scores.data_ptr(),
                                                  keep.data_ptr(), gs.data_ptr(), weight.numel(), 300, int(per_unit),
                                                  *codes, sigmoid, temperature, need_scores, need_weight, None)
            assert status == 0
            assert torch.equal(gw, grad * keep_w if need_weight else grad), (mode, need_scores, need_weight)
            if need_scores:
                torch.testing.assert_close(gs, want_gs, msg=f"{mode} grad_scores")
            else:
                assert torch.all(gs == 7.0)
    out = torch.empty_like(weight)
    assert lib.bise_keep_weight(weight.data_ptr(), keep.data_ptr(), out.data_ptr(), weight.numel(), 300,
                                int(per_unit), CODES[weight_dtype], None) == 0
    assert torch.equal(out, weight * keep_w)
    out, failed = _masked_weight(lib, weight, scores, thr, cut)  # the mask pass on 16-bit weights too
    assert failed == 0 and torch.equal(out, weight * keep_w)
