"""The C++ CPU selection kernels (backend "cpp") against the reference: bit-identical thr, cut, mask.

Sizes above 2^15 take the sampling-bracket path (warm and cold brackets, misses, overflow into
radix refinement); smaller ones the direct radix path.
"""

import pytest
import torch

import bise_kernels as bk
from _oracle import adversarial_inputs
from bise_kernels.backends import reference as ref
from bise_kernels.backends import why_unavailable

try:
    from bise_kernels.backends.cpp import select as cpp
except ImportError as exc:  # the compiled extension is missing
    pytest.skip(f"cpp backend unavailable: {exc} ({why_unavailable('cpp')})", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> list[int]:
    """Raw bit patterns, so that -0.0 and +0.0 (and every other value) must match exactly."""
    return t.reshape(-1).view(BITS[t.element_size()]).tolist()


def assert_select(tensors, k, hint=None, what=""):
    thr, cut = cpp.topk_select(tensors, k, hint)
    want_thr, want_cut = ref.topk_select(tensors, k)
    assert thr.dtype == want_thr.dtype and thr.dim() == 0 and cut.dtype == torch.int64 and cut.dim() == 0
    assert bits(thr) == bits(want_thr), (what, k, thr, want_thr)
    assert int(cut) == int(want_cut), (what, k, cut, want_cut)
    return thr, cut


def ks_for(n):
    return sorted({1, min(2, n), n // 3 or 1, n // 2 or 1, n - 1 or 1, n})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 7, 1000, 40_000])
def test_adversarial_inputs_bit_identical(dtype, n):
    for name, scores in adversarial_inputs(n, dtype, seed=n).items():
        for k in ks_for(n) if n < 10_000 else (1, n // 3, n - 1):
            assert_select([scores], k, what=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_k_on_small_tied_tensor(dtype):
    scores = torch.randint(-2, 3, (6, 5)).to(dtype)
    scores[0, 0] = -0.0
    for k in range(1, scores.numel() + 1):
        thr, cut = assert_select([scores], k)
        mask = cpp.keep_mask(scores, thr, cut)
        assert int(mask.sum()) == k
        assert torch.equal(mask, ref.keep_mask(scores, thr, cut))


def test_large_multi_chunk_random_and_sorted():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400_000, generator=g)
    for scores in (x, torch.sort(x).values, torch.sort(x, descending=True).values):
        for k in (1, 7, 123_457, 200_000, 399_999, 400_000):
            assert_select([scores], k)


def test_ties_inside_a_wide_bracket_fall_back_to_radix_refinement():
    # Half the entries are exactly 0 and the rest spread out: the bracket around the median
    # holds far more than can be compacted, so the counting pass and radix passes finish it.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200_000, generator=g)
    x[::2] = 0
    for k in (50_000, 100_000, 149_999, 150_001):
        assert_select([x], k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hint_correct_wrong_and_far_off(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60_000, generator=g).to(dtype)
    for k in (1, 30_000, 59_000):
        thr, _ = ref.topk_select([x], k)
        finfo = torch.finfo(dtype)
        hints = [thr, (thr.double() * 1.01 + 0.01).to(dtype), (thr.double() - 0.5).to(dtype),
                 torch.tensor(finfo.max, dtype=dtype), torch.tensor(finfo.min, dtype=dtype),
                 torch.tensor(-0.0, dtype=dtype), torch.tensor(3.0, dtype=torch.float64)]
        for hint in hints:
            assert_select([x], k, hint, what=f"hint {hint}")


def test_hint_on_tied_and_sorted_data():
    n = 70_000
    tied = torch.randint(0, 3, (n,)).float()
    ordered = torch.arange(n, dtype=torch.float32)
    for scores in (tied, ordered, torch.zeros(n)):
        for k in (1, n // 2, n):
            for hint in (torch.tensor(1.0), torch.tensor(float(n)), torch.tensor(-5.0)):
                assert_select([scores], k, hint)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_list_mode_is_the_virtual_concatenation(dtype):
    g = torch.Generator().manual_seed(6)
    tensors = [torch.randn(s, generator=g).to(dtype) for s in (3, 40_000, 1, 17_000, 5)]
    tensors[1][::7] = 0.5  # ties that span tensor boundaries
    tensors[3][:100] = 0.5
    tensors[2][0] = 0.5
    n = sum(t.numel() for t in tensors)
    for k in (1, 4, 20_000, 28_571, n - 1, n):
        assert_select(tensors, k)
    small = [torch.randint(0, 2, (s,)).to(dtype) for s in (2, 1, 4)]
    for k in range(1, 8):
        assert_select(small, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_matches_independent_selections(dtype):
    g = torch.Generator().manual_seed(7)
    sizes = [1, 9, 300, 4096, 40_000, 150_000, 2]
    tensors = [torch.randn(s, generator=g).to(dtype) for s in sizes]
    tensors[3].zero_()
    tensors[4] = torch.randint(0, 4, (40_000,), generator=g).to(dtype)
    ks = [1, 5, 150, 2048, 20_000, 75_000, 2]
    want_thr, want_cut = ref.batched_topk_select(tensors, ks)
    for hints in (None, want_thr, torch.zeros(len(sizes), dtype=dtype)):
        thrs, cuts = cpp.batched_topk_select(tensors, ks, hints)
        assert thrs.shape == (len(sizes),) and cuts.shape == (len(sizes),)
        assert bits(thrs) == bits(want_thr) and cuts.tolist() == want_cut.tolist()


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(8)
    base = torch.randint(0, 5, (300, 250), generator=g).float()
    views = [base.t(), base[:, ::2], base[::3].t()]
    for v in views:
        assert not v.is_contiguous()
        for k in (1, v.numel() // 2, v.numel()):
            thr, cut = assert_select([v], k)
            assert torch.equal(cpp.keep_mask(v, thr, cut), ref.keep_mask(v, thr, cut))
    thrs, cuts = cpp.batched_topk_select(views, [10, 20, 30])
    want = ref.batched_topk_select([v.contiguous() for v in views], [10, 20, 30])
    assert torch.equal(thrs, want[0]) and torch.equal(cuts, want[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_mask_matches_reference(dtype):
    # Above 2^20 entries the mask pass is split over threads; thr and cut need not come from a
    # selection (threshold mode uses KEEP_ALL_TIES), so any value and cut must match.
    n = (1 << 21) + 3
    for name, scores in adversarial_inputs(n, dtype, seed=9).items():
        if name not in ("random", "signed_zeros", "few_values"):
            continue
        scores = scores[: n - 3].reshape(1024, -1)
        thr = scores.reshape(-1)[12_345] + 0
        for offset in (0, 1000):
            for c in (0, n // 3, n - 10, ref.KEEP_ALL_TIES):
                cut = torch.tensor(c)
                got = cpp.keep_mask(scores, thr, cut, offset)
                assert got.shape == scores.shape and got.dtype == torch.bool
                assert torch.equal(got, ref.keep_mask(scores, thr, cut, offset)), (name, c, offset)


def test_bad_input_errors_name_the_argument():
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="k must be in"):
        cpp.topk_select([x], 11)
    with pytest.raises(RuntimeError, match="k must be in"):
        cpp.topk_select([x], 0)
    with pytest.raises(RuntimeError, match=r"scores\[1\] has dtype"):
        cpp.topk_select([x, x.double()], 3)
    with pytest.raises(RuntimeError, match=r"ks\[0\] must be in"):
        cpp.batched_topk_select([x], [12])
    with pytest.raises(RuntimeError, match=r"scores\[0\] must be float32/float64/float16/bfloat16"):
        cpp.topk_select([torch.arange(4)], 1)
    with pytest.raises(RuntimeError, match=r"hints must have 2 element\(s\)"):
        cpp.batched_topk_select([x, x], [1, 1], torch.zeros(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_public_api_on_cpp_backend_equals_reference(dtype):
    g = torch.Generator().manual_seed(10)
    layers = [torch.randn(s, generator=g).to(dtype) for s in ((64, 3, 3, 3), (50_000,), (128, 64))]
    layers[2][:, :10] = 0
    results = {}
    for name in ("torch", "cpp"):
        with bk.use_backend(name):
            results[name] = (
                [bk.topk_mask(t, 0.3) for t in layers],
                bk.global_topk_masks(layers, 0.25),
                bk.layerwise_topk_masks(layers, [0.1, 0.5, 0.9]),
                [bk.topk_threshold(t, 17) for t in layers],
                [bk.topk_threshold(t, 17, hint=torch.tensor(0.1)) for t in layers],
            )
    for got, want in zip(results["cpp"], results["torch"]):
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b) if a.dtype == torch.bool else bits(a) == bits(b)
