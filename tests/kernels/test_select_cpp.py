"""The C++ CPU select (backend "cpp") at the sizes of its own paths, bit for bit against the reference.

Sizes above 2^15 take the sampling-bracket path (warm and cold brackets, misses, overflow into
radix refinement); the small case set (test_select_kernels.py) covers the direct radix path, and
test_native_checks.py the ops' argument errors.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bise_kernels as bk
from _oracle import adversarial_inputs
from _select_cases import (DTYPES, assert_same_selection, bits, check_adversarial, check_batched, check_keep_mask,
                           check_list, check_topk_keep_mask)
from bise_kernels.backends import BackendUnavailableError, kernel_table
from bise_kernels.backends import reference as ref

DEVICE = "cpu"


@pytest.fixture(scope="module")
def kernels():
    try:
        return kernel_table("cpp")
    except BackendUnavailableError as exc:  # the compiled extension is missing
        pytest.skip(f"cpp backend unavailable: {exc}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_adversarial_inputs_in_the_bracket_path(kernels, dtype):
    n = 40_000
    check_adversarial(kernels, DEVICE, n, dtype, (1, n // 3, n - 1))


def test_large_multi_chunk_random_and_sorted(kernels):
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(3))
    for scores in (x, torch.sort(x).values, torch.sort(x, descending=True).values):
        check_list(kernels, DEVICE, [scores], (1, 7, 123_457, 200_000, 399_999, 400_000))


def test_ties_inside_a_wide_bracket_fall_back_to_radix_refinement(kernels):
    # Half the entries are exactly 0 and the rest spread out: the bracket around the median
    # holds far more than can be compacted, so the counting pass and radix passes finish it.
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(4))
    x[::2] = 0
    check_list(kernels, DEVICE, [x], (50_000, 100_000, 149_999, 150_001))


@pytest.mark.parametrize("dtype", DTYPES)
def test_hint_correct_wrong_and_far_off(kernels, dtype):
    x = torch.randn(60_000, generator=torch.Generator().manual_seed(5)).to(dtype)
    finfo = torch.finfo(dtype)
    for k in (1, 30_000, 59_000):
        thr, _ = ref.topk_select([x], k)
        hints = [thr, (thr.double() * 1.01 + 0.01).to(dtype), (thr.double() - 0.5).to(dtype),
                 torch.tensor(finfo.max, dtype=dtype), torch.tensor(finfo.min, dtype=dtype),
                 torch.tensor(-0.0, dtype=dtype), torch.tensor(3.0, dtype=torch.float64)]
        for hint in hints:
            check_list(kernels, DEVICE, [x], (k,), hint=hint)


def test_hint_on_tied_and_sorted_data(kernels):
    n = 70_000
    for scores in (torch.randint(0, 3, (n,)).float(), torch.arange(n, dtype=torch.float32), torch.zeros(n)):
        for hint in (torch.tensor(1.0), torch.tensor(float(n)), torch.tensor(-5.0)):
            check_list(kernels, DEVICE, [scores], (1, n // 2, n), hint=hint)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_list_mode_is_the_virtual_concatenation(kernels, dtype):
    g = torch.Generator().manual_seed(6)
    tensors = [torch.randn(s, generator=g).to(dtype) for s in (3, 40_000, 1, 17_000, 5)]
    tensors[1][::7] = 0.5  # ties that span tensor boundaries
    tensors[3][:100] = 0.5
    tensors[2][0] = 0.5
    n = sum(t.numel() for t in tensors)
    check_list(kernels, DEVICE, tensors, (1, 4, 20_000, 28_571, n - 1, n))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batched_matches_independent_selections(kernels, dtype):
    g = torch.Generator().manual_seed(7)
    sizes = [1, 9, 300, 4096, 40_000, 150_000, 2]
    tensors = [torch.randn(s, generator=g).to(dtype) for s in sizes]
    tensors[3].zero_()
    tensors[4] = torch.randint(0, 4, (40_000,), generator=g).to(dtype)
    ks = [1, 5, 150, 2048, 20_000, 75_000, 2]
    for hints in (None, ref.batched_topk_select(tensors, ks)[0], torch.zeros(len(sizes), dtype=dtype)):
        check_batched(kernels, DEVICE, tensors, ks, hints)


def test_non_contiguous_inputs(kernels):
    base = torch.randint(0, 5, (300, 250), generator=torch.Generator().manual_seed(8)).float()
    views = [base.t(), base[:, ::2], base[::3].t()]
    for v in views:
        assert not v.is_contiguous()
        check_list(kernels, DEVICE, [v], (1, v.numel() // 2, v.numel()))
        check_keep_mask(kernels, DEVICE, v, v.numel() // 2, offset=0)
    check_batched(kernels, DEVICE, views, [10, 20, 30])


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_mask_split_over_threads_for_any_threshold_and_cut(kernels, dtype):
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
                got = kernels["keep_mask"](scores, thr, cut, offset)
                assert got.shape == scores.shape and got.dtype == torch.bool
                assert torch.equal(got, ref.keep_mask(scores, thr, cut, offset)), (name, c, offset)
                if c == n // 3 and name == "random":  # check_finite: the same mask, in the same pass
                    assert torch.equal(kernels["keep_mask"](scores, thr, cut, offset, True), got)


def test_two_threads_split_every_pass_into_chunks(kernels):
    """Above 2^20 scores two threads split each pass into chunks of blocks (one thread or fewer
    scores: one chunk, whatever the tests' OMP_NUM_THREADS): the compacted buffers, the tie located
    in the second chunk, the fused keep masks and the radix histograms summed over chunks."""
    n = (1 << 20) + (1 << 18) + 11
    g = torch.Generator().manual_seed(12)
    x = torch.randn(n, generator=g)
    x[5::3] = 0.25  # a third of the scores tied: the bracket around them overflows into radix passes
    above, ties = int((x > 0.25).sum()), int((x == 0.25).sum())
    ks = (1, n // 5, above + 1, above + ties // 2, above + ties - 1, n - 7)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check_list(kernels, DEVICE, [x], ks)
        check_list(kernels, DEVICE, [x[:700_001], x[700_001:]], (n // 5, above + ties // 2))
        check_topk_keep_mask(kernels, DEVICE, [x], (n // 5, n // 2, above + ties // 2))
        check_batched(kernels, DEVICE, [x, x[:1000]], [above + ties // 2, 3])
    finally:
        torch.set_num_threads(threads)


def test_three_threads_uneven_chunks_and_a_list_across_their_edges(kernels):
    """Three threads: 3 chunks of 128, 129 and 129 blocks (the tie and the fused masks' offsets in the
    middle chunk too), over a list of 40 pieces cut at the chunk edges +-1, at block edges and into
    single scores (a case shape of scripts/fuzz_select.py, which no other test has)."""
    n = 3 * (1 << 19) + 4097
    g = torch.Generator().manual_seed(13)
    x = torch.randn(n, generator=g)
    x[torch.rand(n, generator=g) < 0.3] = 0.5  # ties at the threshold in every chunk
    above, ties = int((x > 0.5).sum()), int((x == 0.5).sum())
    edges = {1, 2, 4095, 4096, 4097, 1 << 19, (1 << 19) + 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 4096, n - 1}
    edges |= set(torch.randint(1, n, (28,), generator=g).tolist())
    edges = [0, *sorted(edges), n]
    pieces = [x[a:b] for a, b in zip(edges, edges[1:])]
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        check_list(kernels, DEVICE, pieces, (above + ties // 2, n // 3))
        check_topk_keep_mask(kernels, DEVICE, pieces, (above + 1, above + ties // 2))
        check_batched(kernels, DEVICE, [x, x[:1000]], [above + ties - 1, 3])
    finally:
        torch.set_num_threads(threads)


def test_keep_mask_checks_finite_in_every_block_and_thread(kernels):
    """keep_mask's check_finite over 2 threads and blocks of 4096: a NaN / inf in any block (first,
    one past a block boundary, the last, a partial one at the end, past the tie cut) raises."""
    n = (1 << 21) + 1001
    x = torch.randn(n)
    thr, cut = torch.tensor(0.0), torch.tensor(n // 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for pos in (0, 4096, (1 << 20) + 5, n // 3 + 1, n - 1):
            for bad in (float("nan"), float("-inf")):
                y = x.clone()
                y[pos] = bad
                with pytest.raises(ValueError, match=f"scores contains non-finite values \\(e.g. {bad}\\)"):
                    kernels["keep_mask"](y, thr, cut, 0, True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_public_api_in_the_bracket_path_equals_the_torch_backend(dtype):
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
    for what, (got, want) in enumerate(zip(results["cpp"], results["torch"])):
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape, what
            assert torch.equal(a, b) if a.dtype == torch.bool else torch.equal(bits(a), bits(b)), what


def _with(x: torch.Tensor, pos: int, bad: float) -> torch.Tensor:
    x = x.clone()
    x[pos] = bad
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1000, 100_003])  # the direct compacting pass; the bracket pass (odd tail)
def test_the_select_pass_raises_on_nan_and_inf_anywhere(kernels, dtype, n):
    """The finiteness check fused into the first pass: first, last (in the scalar tail after the
    vector groups), middle element, an unaligned view, the second tensor of a list and the second
    problem of a batch; the error names the tensor and a value like _checks.check_finite."""
    x = torch.randn(n + 1, generator=torch.Generator().manual_seed(1)).to(dtype)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, n - 1, n // 2, n - 3):
            y = _with(x[:n], pos, bad)
            with pytest.raises(ValueError, match=f"scores contains non-finite values \\(e.g. {bad}\\)"):
                kernels["topk_select"]([y], n // 2, None)
            with pytest.raises(ValueError, match=f"scores contains non-finite values \\(e.g. {bad}\\)"):
                kernels["topk_select"]([_with(x, pos + 1, bad)[1:]], 1, None)  # not 64-byte aligned
            with pytest.raises(ValueError, match=f"scores\\[1\\] contains non-finite values \\(e.g. {bad}\\)"):
                kernels["topk_select"]([x[:7], y], n, None)
            with pytest.raises(ValueError, match=f"scores\\[1\\] contains non-finite values \\(e.g. {bad}\\)"):
                kernels["batched_topk_select"]([x[:7], y], [3, n], None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_largest_finite_values_pass_the_check(kernels, dtype):
    """+-max float, the smallest subnormals and -0.0 are finite: selected exactly, no error."""
    info = torch.finfo(dtype)
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[:6] = torch.tensor([info.max, -info.max, info.smallest_normal / 4, -info.smallest_normal / 4, -0.0, 0.0],
                         dtype=dtype)
    x[-1] = -info.max
    for k in (1, 2, 50_000, 99_999, 100_000):
        assert_same_selection(kernels["topk_select"]([x], k, None), ref.topk_select([x], k), k)
    kernels["batched_topk_select"]([x[:1], x[1:2], x], [1, 1, 3], None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1000, 100_003])  # keep_mask after the select; masks of the fused pass
def test_topk_keep_mask_equals_select_then_keep_mask(kernels, dtype, n):
    """Adversarial inputs (ties at the threshold, +-0.0, all equal: missed or overflowing brackets,
    whose masks come from a keep_mask pass), k = 1 .. n, as one tensor of another shape."""
    for name, x in adversarial_inputs(n, dtype, seed=8).items():
        check_topk_keep_mask(kernels, DEVICE, [x], (1, 2, n // 3, n - 1, n))
    x = adversarial_inputs(n, dtype, seed=9)["random"]
    check_topk_keep_mask(kernels, DEVICE, [x[: n - n % 7].reshape(7, -1)], (n // 2,))


def test_topk_keep_mask_of_lists_hints_and_ties(kernels):
    g = torch.Generator().manual_seed(10)
    tensors = [torch.randn(300, 200, generator=g), torch.randint(0, 3, (7,), generator=g).float(), torch.zeros(5),
               torch.randn(40_001, generator=g)[1:], -torch.zeros(3, 3)]
    total = sum(t.numel() for t in tensors)
    check_topk_keep_mask(kernels, DEVICE, tensors, (1, 100, total // 2, total - 3, total))
    exact = ref.topk_select(tensors, total // 2)[0]
    for hint in (exact, exact + 1e-3, torch.tensor(-0.0), torch.tensor(float("nan"))):
        check_topk_keep_mask(kernels, DEVICE, tensors, (total // 2,), hint)
    ties = torch.randn(100_000, generator=g)
    ties[::5] = 1.0
    ties[1::5] = 1.0
    above = int((ties > 1.0).sum())
    check_topk_keep_mask(kernels, DEVICE, [ties], (above + 1, above + 20_000, above + 40_000))
    strided = torch.randn(400, 300, generator=g).t()  # non-contiguous: a contiguous copy is selected
    check_topk_keep_mask(kernels, DEVICE, [strided], (60_000,))
    x = torch.randn(100_000, generator=g)
    x[77] = float("nan")
    with pytest.raises(ValueError, match="scores contains non-finite values"):
        kernels["topk_keep_mask"]([x], 5, None)
    with pytest.raises(ValueError, match=r"k must be in \[1, 100000\]"):
        kernels["topk_keep_mask"]([x], 0, None)


def _sampled_positions(n: int, k: int, itemsize: int) -> torch.Tensor:
    """The flat indices the C++ select samples for a bracket (csrc/cpu/select.cpp, sample_keys): runs
    of 256 bytes at splitmix64 offsets seeded by (n, k), about n^(2/3) keys."""
    mask = 2**64 - 1
    run = 256 // itemsize
    size = min(1 << 16, int(n ** (1 / 3) * n ** (1 / 3)))
    runs = max(1, min(size, n // 8) // run)
    seed, starts = (n * 31 + k) & mask, []
    for _ in range(runs):
        seed = (seed + 0x9E3779B97F4A7C15) & mask
        z = seed
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        starts.append((z ^ (z >> 31)) % (n - run + 1))
    return (torch.tensor(starts)[:, None] + torch.arange(run)).flatten().unique()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_bracket_missing_finishes_from_the_narrowed_state(kernels, dtype):
    """Scores whose sample misleads both cold brackets: every sampled score lies in [0, 1], the top
    31 000 (in [2, 3]) and the rest (in [-3, -2]) lie outside the sample. Both brackets miss below
    rank k; the selection finishes by compacting the keys above the last bracket (no radix pass),
    which must count exactly the keys the misses left in the state."""
    n, k = 100_000, 30_000
    g = torch.Generator().manual_seed(11)
    sampled = _sampled_positions(n, k, torch.empty((), dtype=dtype).element_size())
    x = torch.rand(n, generator=g, dtype=torch.float64) - 3
    x[sampled] = torch.rand(len(sampled), generator=g, dtype=torch.float64)
    outside = torch.ones(n, dtype=torch.bool)
    outside[sampled] = False
    top = outside.nonzero().flatten()[torch.randperm(int(outside.sum()), generator=g)[:31_000]]
    x[top] = torch.rand(len(top), generator=g, dtype=torch.float64) + 2
    x = x.to(dtype)
    x[top[:500]] = 2.5  # ties at the threshold for some k
    check_list(kernels, DEVICE, [x], (k, 30_500, 31_000))
    check_topk_keep_mask(kernels, DEVICE, [x], (k,))


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_the_scans_of_cpus_without_avx512(kernels, capability):
    """The bracket pass scans float32 and 16-bit scores with AVX-512 where ATen's kernels use it, else with
    AVX2 (AMD before Zen 4, Intel client cores), else with the portable loop: this module again in a process
    held to each level below this CPU's (ATEN_CPU_CAPABILITY; the results must be the same bits)."""
    levels = ["DEFAULT", "AVX2", "AVX512"]
    native = torch.backends.cpu.get_cpu_capability()
    if native not in levels or levels.index(native) <= levels.index(capability.upper()):
        pytest.skip(f"torch's CPU kernels here are {native}: the tests above ran the {capability} scan or none")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    held = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert held.stdout.strip() == capability.upper(), held.stdout + held.stderr  # torch heeds the variable
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "not cpus_without_avx512"], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


def _misleading_sample(n: int, k: int, hint: float, sample_range, regions, dtype, seed: int) -> torch.Tensor:
    """Scores whose sampled positions (csrc/cpu/select.cpp, sample_keys) hold 40 values within 0.05 of
    `hint` (the warm bracket) and the rest in `sample_range` (the cold brackets); the other positions
    fill `regions` in order, (count or None for the rest, low, high) each."""
    g = torch.Generator().manual_seed(seed)
    sampled = _sampled_positions(n, k, torch.empty((), dtype=dtype).element_size())
    sampled = sampled[torch.randperm(len(sampled), generator=g)]
    x = torch.empty(n, dtype=torch.float64)
    x[sampled[:40]] = hint + (torch.rand(40, generator=g, dtype=torch.float64) - 0.5) * 0.1
    lo, hi = sample_range
    x[sampled[40:]] = lo + torch.rand(len(sampled) - 40, generator=g, dtype=torch.float64) * (hi - lo)
    free = torch.ones(n, dtype=torch.bool)
    free[sampled] = False
    free = free.nonzero().flatten()[torch.randperm(int(free.sum()), generator=g)]
    start = 0
    for count, lo, hi in regions:
        part = free[start:] if count is None else free[start:start + count]
        start += len(part)
        x[part] = lo + torch.rand(len(part), generator=g, dtype=torch.float64) * (hi - lo)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["warm_below_then_cold_above", "warm_above_then_cold_below"])
def test_a_warm_miss_then_cold_misses_count_the_state_exactly(kernels, dtype, case):
    """The warm bracket misses on one side of rank k, both cold ones on the other: the state keeps
    the keys above it (gt) from the warm miss and the count inside (c) from the cold misses, which
    must be relative to the state (not to all n scores); the finish then compacts exactly c keys."""
    n = 100_000
    if case == "warm_below_then_cold_above":  # hint far above rank k, the sample's bulk far below
        k, hint = 20_000, 2.55
        x = _misleading_sample(n, k, hint, (-3.0, -2.0), [(25_000, 0.0, 1.0), (None, -3.0, -2.0)], dtype, 21)
    else:  # hint far below rank k, the sample's bulk far above
        k, hint = 80_000, -2.55
        x = _misleading_sample(n, k, hint, (2.0, 3.0), [(72_000, 2.0, 3.0), (None, 0.0, 1.0)], dtype, 22)
    for k_ in (k, k + 1):
        check_list(kernels, DEVICE, [x], (k_,), hint=torch.tensor(hint, dtype=dtype))
    check_topk_keep_mask(kernels, DEVICE, [x], (k,), hint=torch.tensor(hint, dtype=dtype))
