"""CUDA radix select (backend "cuda", csrc/cuda/select.cu) against the reference, bit for bit.

Needs a GPU and the extension built with its CUDA kernels; skipped otherwise. The cases mirror
test_select_triton.py, at the interpreter's tiny sizes (a chunk of 16384 elements and a buffer
of 2048 entries are then one chunk and never overflow, so larger cases follow).
"""

import pytest
import torch

from _select_cases import (DTYPES, check_adversarial, check_batched, check_every_k, check_hints, check_keep_mask,
                           check_list)
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
@pytest.mark.parametrize("n", [131, 100_003])
def test_select_is_bit_identical_on_adversarial_inputs(kernels, dtype, n):
    check_adversarial(kernels, DEVICE, n, dtype, (1, 2, n // 2, n - 1, n))


def test_select_is_exact_for_every_k_on_a_tied_tensor(kernels):
    check_every_k(kernels, DEVICE, torch.tensor([2.0, -0.0, 1, 2, 0.0, -3, 2, 1, 1, 5, 0.0, 2, -1, 2, 7, 1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_hint_speeds_up_but_never_changes_the_result(kernels, dtype):
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(3)).to(dtype)
    check_hints(kernels, DEVICE, x, 120_000)


def test_global_selection_over_a_list_without_concatenation(kernels):
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randint(0, 5, s, generator=g).float() for s in [(3, 50), (7,), (2, 3, 2), (1,), (40_000,)]]
    check_list(kernels, DEVICE, tensors, (1, 100, 20_000, 40_170))
    check_list(kernels, DEVICE, tensors, (200,), hint=torch.tensor(2.0))


def test_batched_selection_gives_each_tensor_its_own_k(kernels):
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(150_000, generator=g), torch.zeros(9), torch.randint(0, 3, (4, 20), generator=g).float(),
               torch.randn(1, generator=g), torch.rand(70_000, generator=g)]
    ks = [75_000, 4, 33, 1, 12_345]
    check_batched(kernels, DEVICE, tensors, ks)
    check_batched(kernels, DEVICE, tensors, ks, hints=torch.tensor([0.0, 0.0, 1.0, 9.0, 0.8]))


def test_tie_cut_over_many_chunks(kernels):
    """All-equal scores overflow the buffer: the cut comes from per-chunk tie counts (> 1024 chunks)."""
    x = torch.zeros(20_000_000)
    x[::7] = -0.0
    check_list(kernels, DEVICE, [x], (1, 12_345_677, 20_000_000))


def test_non_contiguous_scores_are_selected_in_logical_order(kernels):
    x = torch.randint(0, 4, (90, 150), generator=torch.Generator().manual_seed(6)).float().t()
    check_list(kernels, DEVICE, [x], (5000,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_mask_matches_reference(kernels, dtype):
    x = torch.randint(-2, 3, (50, 41), generator=torch.Generator().manual_seed(7)).to(dtype)
    x[0, :7] = -0.0
    check_keep_mask(kernels, DEVICE, x, 900, offset=13)
