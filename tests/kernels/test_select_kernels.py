"""Every backend's selection kernels against the reference, bit for bit (cases: _select_cases.py).

Sizes are small enough for the Triton interpreter; each backend file adds the sizes and paths
only it has (test_select_cpp.py: the sampling bracket; test_select_cuda.py: GPU-sized inputs;
test_select_triton.py: the candidate buffer's capacity, the sm_90 compile).
"""

import pytest
import torch

from _select_cases import (DTYPES, check_adversarial, check_batched, check_every_k, check_hints, check_keep_mask,
                           check_list)


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_is_bit_identical_on_adversarial_inputs(kernels, dtype):
    n = 131
    check_adversarial(vars(kernels), kernels.device, n, dtype, (1, 2, 66, n - 1, n))


def test_select_is_exact_for_every_k_on_a_tied_tensor(kernels):
    x = torch.tensor([2.0, -0.0, 1, 2, 0.0, -3, 2, 1, 1, 5, 0.0, 2, -1, 2, 7, 1])
    check_every_k(vars(kernels), kernels.device, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hint_speeds_up_but_never_changes_the_result(kernels, dtype):
    x = torch.randn(300, generator=torch.Generator().manual_seed(3)).to(dtype)
    check_hints(vars(kernels), kernels.device, x, 120)


def test_global_selection_over_a_list_without_concatenation(kernels):
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randint(0, 5, s, generator=g).float() for s in [(3, 50), (7,), (2, 3, 2), (1,), (140,)]]
    check_list(vars(kernels), kernels.device, tensors, (1, 100, 310))
    check_list(vars(kernels), kernels.device, tensors, (200,), hint=torch.tensor(2.0))


def test_batched_selection_gives_each_tensor_its_own_k(kernels):
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(150, generator=g), torch.zeros(9), torch.randint(0, 3, (4, 20), generator=g).float(),
               torch.randn(1, generator=g)]
    ks = [75, 4, 33, 1]
    check_batched(vars(kernels), kernels.device, tensors, ks)
    check_batched(vars(kernels), kernels.device, tensors, ks, hints=torch.tensor([0.0, 0.0, 1.0, 9.0]))


def test_all_equal_scores_cut_through_one_tie_group(kernels):
    x = torch.zeros(1100)
    x[::7] = -0.0
    check_list(vars(kernels), kernels.device, [x], (1, 700, 1100))


def test_non_contiguous_scores_are_selected_in_logical_order(kernels):
    x = torch.randint(0, 4, (9, 15), generator=torch.Generator().manual_seed(6)).float().t()
    check_list(vars(kernels), kernels.device, [x], (50,))


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_mask_matches_reference(kernels, dtype):
    x = torch.randint(-2, 3, (5, 41), generator=torch.Generator().manual_seed(7)).to(dtype)
    x[0, :7] = -0.0
    check_keep_mask(vars(kernels), kernels.device, x, 90, offset=13)
