"""The "cuda" backend's fused masked-layer and channel-gate kernels against the reference backend.

Kernel tests need a GPU and an extension built WITH_CUDA; without them they skip. The nvcc
compile check of the torch-free kernel sources runs wherever nvcc is installed. Bad input to the
CUDA ops: tests/kernels/test_native_checks.py (in a child process, so a crash fails one test).
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import torch

import bise_kernels
from _masked_cases import CONV_CASES, DTYPES, ESTIMATORS, GATE_LAYOUTS, assert_grads, check_conv, check_gate, \
    check_linear, randn, tied_scores, tol
from bise_kernels.backends import reference as R

CSRC = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "cuda"


@pytest.fixture(scope="module")
def cuda():
    """The cuda backend's masked kernels, or a skip saying why they cannot run here."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    try:
        from bise_kernels.backends.cuda import masked
    except ImportError as exc:
        pytest.skip(f"cuda masked kernels unavailable: {exc}")
    return masked


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_kernel_sources_compile_with_nvcc(tmp_path):
    jobs = [subprocess.Popen(["nvcc", "-O2", "-arch=sm_90", "-std=c++17", "-Xcompiler", "-fPIC", "-c", str(src),
                              "-o", str(tmp_path / (src.stem + ".o"))], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for src in (CSRC / "masked.cu", CSRC / "gate.cu")]
    for job in jobs:
        out, _ = job.communicate(timeout=300)
        assert job.returncode == 0, out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("estimator,temperature", ESTIMATORS)
def test_masked_linear_matches_reference(cuda, dtype, structured, estimator, temperature):
    check_linear(cuda, "cuda", dtype, structured, estimator, temperature)


@pytest.mark.parametrize("needs", [[True, False, False, False], [False, True, True, False], [False, False, False, True]],
                         ids=["x", "weight_bias", "scores"])
def test_masked_linear_computes_only_needed_gradients(cuda, needs):
    check_linear(cuda, "cuda", torch.float32, True, "sigmoid", 2.0, needs)


def test_masked_linear_large_rows_and_scores_dtype(cuda):
    """Rows longer than a block, many blocks; bf16 weights with fp32 scores."""
    x, w = randn(33, 1000, dtype=torch.bfloat16, seed=1, device="cuda"), \
        randn(301, 1000, dtype=torch.bfloat16, seed=2, device="cuda")
    for shape in [(301,), (301, 1000)]:
        scores, thr, cut = tied_scores(shape, seed=3, device="cuda")
        args = (randn(33, 301, dtype=torch.bfloat16, seed=4, device="cuda"), x, w, scores, thr, cut, "ste", 1.0,
                [True, True, False, True])
        got, want = cuda.masked_linear_backward(*args), R.masked_linear_backward(*args)
        assert_grads(got[:3], want[:3], torch.bfloat16)
        torch.testing.assert_close(got[3], want[3], rtol=2e-2, atol=0.5)  # row sums of 1000 bf16 products


@pytest.mark.parametrize("conv_case", CONV_CASES)
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_conv2d_matches_reference(cuda, conv_case, structured, channels_last):
    check_conv(cuda, "cuda", torch.float32, conv_case, structured, channels_last)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_masked_conv2d_dtypes(cuda, dtype):
    check_conv(cuda, "cuda", dtype, CONV_CASES[2], True, True)


@pytest.mark.parametrize("layout", list(GATE_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator,temperature", ESTIMATORS)
def test_channel_gate_matches_reference(cuda, layout, dtype, estimator, temperature):
    check_gate(cuda, "cuda", layout, dtype, estimator, temperature)


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_gate_many_chunks(cuda, channels_last):
    """Several outer chunks and a partial channel tile in both reduction kernels."""
    x = randn(37, 37, 9, 10, seed=1, device="cuda")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    scores, thr, cut = tied_scores((37,), seed=2, device="cuda")
    args = (randn(*x.shape, seed=3, device="cuda"), x, scores, thr, cut, 1, "sigmoid", 1.0, [True, True])
    got, want = cuda.channel_gate_backward(*args), R.channel_gate_backward(*args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-4)


def test_public_api_matches_torch_backend(cuda):
    x, w, s = randn(5, 12, seed=1, device="cuda"), randn(7, 12, seed=2, device="cuda"), randn(7, seed=3, device="cuda")
    xc = randn(2, 4, 8, 9, seed=4, device="cuda").to(memory_format=torch.channels_last)
    wc, sc = randn(6, 2, 3, 3, seed=5, device="cuda"), randn(6, 2, 3, 3, seed=6, device="cuda")
    cases = [
        (lambda x, w, s: bise_kernels.masked_linear(x, w, None, s, density=0.4, estimator="sigmoid"), (x, w, s)),
        (lambda x, w, s: bise_kernels.masked_conv2d(x, w, None, s, density=0.6, stride=2, padding=1, groups=2),
         (xc, wc, sc)),
        (lambda x, s: bise_kernels.channel_gate(x, s, threshold=0.1), (xc, randn(4, seed=7, device="cuda"))),
    ]
    for fn, tensors in cases:
        results = []
        for backend in ("cuda", "torch"):
            leaves = [t.detach().requires_grad_() for t in tensors]
            with bise_kernels.use_backend(backend):
                y = fn(*leaves)
                y.backward(randn(*y.shape, seed=9, device="cuda"))
            results.append((y.detach(), [t.grad for t in leaves]))
        torch.testing.assert_close(results[0][0], results[1][0], **tol(torch.float32))
        assert_grads(results[0][1], results[1][1], torch.float32)

