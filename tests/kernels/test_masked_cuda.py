"""What only the "cuda" masked kernels have: the nvcc compile of their sources, rows longer than a
block, and launch geometries with several outer chunks.

Every backend's outputs and gradients against the reference: test_masked_kernels.py; the ext ops'
argument errors: test_native_checks.py. The kernel tests run on the "cuda" backend where a GPU and
an extension built WITH_CUDA are, and on "cpp" (the same composition, backends/native.py) everywhere,
so that their code runs in CI too; the device-side asserts need a GPU; the nvcc compile check runs
wherever nvcc is installed.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import torch

from _masked_cases import assert_grads, randn, tied_scores
from bise_kernels.backends import BackendUnavailableError, kernel_table
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


@pytest.fixture(scope="module", params=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
def native(request):
    """(kernel table, device) of a native backend: "cuda" on a GPU, "cpp" on the CPU."""
    name = {"cpu": "cpp", "cuda": "cuda"}[request.param]
    try:
        return kernel_table(name), request.param
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))


@pytest.mark.slow  # the compile check for machines without a GPU: on one, the build has just compiled them
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_kernel_sources_compile_with_nvcc(tmp_path):
    jobs = [subprocess.Popen(["nvcc", "-O2", "-arch=sm_90", "-std=c++17", "-Xcompiler", "-fPIC", "-c", str(src),
                              "-o", str(tmp_path / (src.stem + ".o"))], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for src in (CSRC / "masked.cu", CSRC / "gate.cu")]
    for job in jobs:
        out, _ = job.communicate(timeout=300)
        assert job.returncode == 0, out


def test_masked_linear_large_rows_and_scores_dtype(native):
    """Rows longer than a block, many blocks; bf16 weights with fp32 scores."""
    kernels, device = native
    x, w = randn(33, 1000, dtype=torch.bfloat16, seed=1, device=device), \
        randn(301, 1000, dtype=torch.bfloat16, seed=2, device=device)
    for shape in [(301,), (301, 1000)]:
        scores, thr, cut = tied_scores(shape, seed=3, device=device)
        args = (randn(33, 301, dtype=torch.bfloat16, seed=4, device=device), x, w, scores, thr, cut, "ste", 1.0,
                [True, True, False, True])
        got, want = kernels["masked_linear_backward"](*args), R.masked_linear_backward(*args)
        assert_grads(got[:3], want[:3], torch.bfloat16)
        torch.testing.assert_close(got[3], want[3], rtol=2e-2, atol=0.5)  # row sums of 1000 bf16 products


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_gate_many_chunks(native, channels_last):
    """Several outer chunks and a partial channel tile in both reduction kernels."""
    kernels, device = native
    x = randn(37, 37, 9, 10, seed=1, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    scores, thr, cut = tied_scores((37,), seed=2, device=device)
    args = (randn(*x.shape, seed=3, device=device), x, scores, thr, cut, 1, "sigmoid", 1.0, [True, True])
    got, want = kernels["channel_gate_backward"](*args), R.channel_gate_backward(*args)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-4)


_DEVICE_ASSERT = """
import sys, torch, bise_kernels as bk
per_unit, where = sys.argv[1] == "unit", sys.argv[2]
x, w = torch.randn(3, 300, device="cuda"), torch.randn(70, 300, device="cuda")
s = torch.randn(*((70,) if per_unit else (70, 300)), device="cuda")
threshold = 0.0
if where == "thr":
    threshold = torch.tensor(float("inf"), device="cuda")
else:
    s.view(-1)[-1] = float("nan")
with bk.use_backend("cuda"):
    y = bk.masked_linear(x, w, None, s, threshold=threshold)
    torch.cuda.synchronize()
print("NO ASSERT")
"""


@pytest.mark.parametrize("per_unit", ["weight", "unit"])
@pytest.mark.parametrize("where", ["scores", "thr"])
def test_non_finite_scores_and_thr_assert_on_the_device(cuda, per_unit, where):
    """The fused check of the mask pass (a device-side assert: the API skips its own on this backend)
    stops the call and names the argument; in a subprocess, as the assert ends the CUDA context."""
    import sys

    done = subprocess.run([sys.executable, "-c", _DEVICE_ASSERT, per_unit, where], capture_output=True, text=True,
                          timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "NO ASSERT" not in out, out[-2000:]
    assert "device-side assert" in out, out[-2000:]
    assert ("threshold" if where == "thr" else "scores") + " contains non-finite values" in out, out[-2000:]
