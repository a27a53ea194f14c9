"""Public selection API (topk_mask / topk_threshold / global / layerwise) against the stable-sort oracle."""

import pytest
import torch

import bise_kernels as bk
from _oracle import adversarial_inputs, sort_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_equals_stable_sort_on_adversarial_inputs(backend, dtype):
    for name, scores in adversarial_inputs(67, dtype).items():
        for k in (1, 2, 33, 66, 67):
            mask = bk.topk_mask(scores, k / scores.numel())
            assert torch.equal(mask, sort_mask(scores, k)), (name, k)


def test_topk_mask_keeps_exactly_k_for_every_k(backend):
    scores = torch.randint(0, 4, (5, 7)).float()
    for k in range(1, 36):
        mask = bk.topk_mask(scores, k / 35)
        assert mask.shape == scores.shape and mask.dtype == torch.bool
        assert int(mask.sum()) == k
        assert torch.equal(mask, sort_mask(scores, k))


def test_topk_mask_breaks_ties_by_lower_index(backend):
    scores = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.0])
    assert bk.topk_mask(scores, 3 / 6).tolist() == [False, True, True, True, False, False]


def test_density_rounds_to_nearest_count_and_keeps_at_least_one(backend):
    scores = torch.randn(10)
    assert int(bk.topk_mask(scores, 0.26).sum()) == 3
    assert int(bk.topk_mask(scores, 0.01).sum()) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_threshold_is_kth_largest_value(backend, dtype):
    for name, scores in adversarial_inputs(41, dtype, seed=1).items():
        ordered = torch.sort(scores, descending=True, stable=True).values
        for k in (1, 20, 41):
            thr = bk.topk_threshold(scores, k)
            assert thr.dim() == 0 and thr.dtype == dtype
            assert thr == ordered[k - 1], (name, k)


def test_zero_threshold_is_positive_zero(backend):
    scores = torch.tensor([-0.0, -0.0, 1.0])
    thr = bk.topk_threshold(scores, 2)
    assert thr == 0 and not torch.signbit(thr)


def test_non_contiguous_scores_are_selected_in_logical_order(backend):
    base = torch.randint(0, 3, (9, 7)).float()
    scores = base.t()
    assert not scores.is_contiguous()
    assert torch.equal(bk.topk_mask(scores, 0.4), sort_mask(scores.contiguous(), round(0.4 * 63)))


def test_hint_never_changes_the_result(backend):
    scores = torch.randn(300)
    expected = sort_mask(scores, 120)
    for hint in (torch.tensor(0.0), torch.tensor(-5.0), torch.tensor(7.0), bk.topk_threshold(scores, 120)):
        assert torch.equal(bk.topk_mask(scores, 0.4, hint=hint), expected)


def test_global_topk_masks_equal_one_sort_over_the_concatenation(backend):
    tensors = [torch.randint(0, 5, s).float() for s in [(3, 4), (7,), (2, 3, 2), (1,)]]
    flat = torch.cat([t.flatten() for t in tensors])
    for density in (0.1, 0.5, 0.77, 1.0):
        k = max(1, round(density * flat.numel()))
        expected = sort_mask(flat, k)
        masks = bk.global_topk_masks(tensors, density)
        assert [m.shape for m in masks] == [t.shape for t in tensors]
        assert torch.equal(torch.cat([m.flatten() for m in masks]), expected)


def test_layerwise_topk_masks_select_each_tensor_independently(backend):
    tensors = [torch.randint(0, 4, s).float() for s in [(5, 5), (11,), (2, 9)]]
    densities = [0.2, 0.5, 0.9]
    masks = bk.layerwise_topk_masks(tensors, densities)
    for t, d, m in zip(tensors, densities, masks):
        assert torch.equal(m, sort_mask(t, max(1, round(d * t.numel()))))


def test_topk_select_describes_the_mask(backend):
    scores = torch.tensor([2.0, 1.0, 2.0, 2.0, 0.5])
    thr, cut = bk.topk_select(scores, 2)
    assert thr == 2.0 and cut.dtype == torch.int64 and int(cut) == 3
