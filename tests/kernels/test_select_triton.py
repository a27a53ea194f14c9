"""Triton radix select (backend "triton") against the reference, bit for bit.

On CPU it runs under TRITON_INTERPRET=1 on tiny inputs (a chunk is 128 elements there, the
candidate buffer 16 entries, so every path runs: several chunks, buffer and overflow tie cuts,
warm starts that hit, half-hit and miss); with a GPU the same checks run compiled, plus sizes
that only a GPU can afford.
"""

import pytest
import torch

from _select_cases import (DTYPES, check_adversarial, check_batched, check_every_k, check_hints, check_keep_mask,
                           check_list)
from bise_kernels.backends import INTERPRET, kernel_table

ON_GPU = torch.cuda.is_available() and not INTERPRET
pytestmark = pytest.mark.skipif(not (ON_GPU or INTERPRET), reason="Triton needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(scope="module")
def kernels():
    return kernel_table("triton")


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_is_bit_identical_on_adversarial_inputs(kernels, dtype):
    n = 131
    ks = (1, 66, n) if dtype == torch.float32 else (2, n)
    check_adversarial(kernels, DEVICE, n, dtype, ks)


def test_select_is_exact_for_every_k_on_a_tied_tensor(kernels):
    check_every_k(kernels, DEVICE, torch.tensor([2.0, -0.0, 1, 2, 0.0, -3, 2, 1, 1, 5, 0.0, 2, -1, 2, 7, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hint_speeds_up_but_never_changes_the_result(kernels, dtype):
    x = torch.randn(300, generator=torch.Generator().manual_seed(3)).to(dtype)
    check_hints(kernels, DEVICE, x, 120)


def test_global_selection_over_a_list_without_concatenation(kernels):
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randint(0, 5, s, generator=g).float() for s in [(3, 50), (7,), (2, 3, 2), (1,), (140,)]]
    check_list(kernels, DEVICE, tensors, (1, 100, 310))
    check_list(kernels, DEVICE, tensors, (200,), hint=torch.tensor(2.0))


def test_batched_selection_gives_each_tensor_its_own_k(kernels):
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(150, generator=g), torch.zeros(9), torch.randint(0, 3, (4, 20), generator=g).float(),
               torch.randn(1, generator=g)]
    ks = [75, 4, 33, 1]
    check_batched(kernels, DEVICE, tensors, ks)
    check_batched(kernels, DEVICE, tensors, ks, hints=torch.tensor([0.0, 0.0, 1.0, 9.0]))


def test_tie_cut_over_many_chunks(kernels):
    """All-equal scores overflow the buffer: the cut comes from per-chunk tie counts."""
    x = torch.zeros(1100)
    x[::7] = -0.0
    check_list(kernels, DEVICE, [x], (700,))


def test_non_contiguous_scores_are_selected_in_logical_order(kernels):
    x = torch.randint(0, 4, (9, 15), generator=torch.Generator().manual_seed(6)).float().t()
    check_list(kernels, DEVICE, [x], (50,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_mask_matches_reference(kernels, dtype):
    x = torch.randint(-2, 3, (5, 41), generator=torch.Generator().manual_seed(7)).to(dtype)
    x[0, :7] = -0.0
    check_keep_mask(kernels, DEVICE, x, 90, offset=13)


@pytest.mark.skipif(not ON_GPU, reason="large sizes need a GPU")
def test_large_inputs_on_gpu(kernels):
    g = torch.Generator().manual_seed(8)
    for dtype in DTYPES:
        check_adversarial(kernels, DEVICE, 1_000_003, dtype, (1, 500_000, 1_000_003))
    layers = [torch.randn(n, generator=g) for n in (9408, 36864, 2359296, 64, 1000 * 2048)]
    check_batched(kernels, DEVICE, layers, [max(1, t.numel() // 3) for t in layers])
    check_list(kernels, DEVICE, layers, (1, 1_000_000))
    check_hints(kernels, DEVICE, torch.randn(3_000_000, generator=g), 1_500_000)
