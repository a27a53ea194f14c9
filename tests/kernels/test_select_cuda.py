"""CUDA radix select (backend "cuda", csrc/cuda/select.cu) at the sizes its paths need, bit for bit.

A chunk of 16384 elements and a buffer of 2048 entries make the small case set
(test_select_kernels.py, which also runs on "cuda") one chunk that never overflows, so the cases
here are larger: several chunks, buffer overflow, > 1024 chunks of ties. Needs a GPU and the
extension built with its CUDA kernels; skipped otherwise.
"""

import pytest
import torch

from _select_cases import (DTYPES, check_adversarial, check_batched, check_hints, check_keep_mask, check_list,
                           skip_unless_supported)
from bise_kernels.backends import BackendUnavailableError, kernel_table

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA select needs a GPU")
DEVICE = "cuda"


@pytest.fixture(scope="module")
def kernels():
    try:
        return kernel_table("cuda")
    except BackendUnavailableError as exc:
        pytest.skip(f"CUDA kernels not built: {exc}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_is_bit_identical_on_adversarial_inputs_of_several_chunks(kernels, dtype):
    skip_unless_supported("cuda", dtype)
    n = 100_003
    check_adversarial(kernels, DEVICE, n, dtype, (1, 2, n // 2, n - 1, n))


@pytest.mark.parametrize("dtype", DTYPES)
def test_hint_speeds_up_but_never_changes_the_result(kernels, dtype):
    skip_unless_supported("cuda", dtype)
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(3)).to(dtype)
    check_hints(kernels, DEVICE, x, 120_000)


def test_global_and_batched_selection_over_several_chunks(kernels):
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randint(0, 5, s, generator=g).float() for s in [(3, 50), (7,), (2, 3, 2), (1,), (40_000,)]]
    check_list(kernels, DEVICE, tensors, (1, 100, 20_000, 40_170))
    layers = [torch.randn(150_000, generator=g), torch.zeros(9), torch.randint(0, 3, (4, 20), generator=g).float(),
              torch.randn(1, generator=g), torch.rand(70_000, generator=g)]
    ks = [75_000, 4, 33, 1, 12_345]
    check_batched(kernels, DEVICE, layers, ks)
    check_batched(kernels, DEVICE, layers, ks, hints=torch.tensor([0.0, 0.0, 1.0, 9.0, 0.8]))


def test_tie_cut_over_many_chunks(kernels):
    """All-equal scores overflow the buffer: the cut comes from per-chunk tie counts (> 1024 chunks)."""
    x = torch.zeros(20_000_000)
    x[::7] = -0.0
    check_list(kernels, DEVICE, [x], (1, 12_345_677, 20_000_000))


def test_non_contiguous_scores_and_keep_mask_over_several_blocks(kernels):
    g = torch.Generator().manual_seed(6)
    check_list(kernels, DEVICE, [torch.randint(0, 4, (90, 150), generator=g).float().t()], (5000,))
    x = torch.randint(-2, 3, (50, 41), generator=g).float()
    x[0, :7] = -0.0
    check_keep_mask(kernels, DEVICE, x, 900, offset=13)
