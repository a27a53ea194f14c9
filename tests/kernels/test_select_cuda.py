"""CUDA select (backend "cuda", csrc/cuda/select*.cu) at the sizes its paths need, bit for bit,
on both algorithms that BISE_SELECT_CUDA picks (csrc/cuda/select_binding.cpp): the radix select
and the bracket select, the latter also with its radix fallback forced ("bracket-miss": every
bracket misses, "bracket-overflow": no candidate buffer).

The radix select's chunk of 16384 elements and buffer of 2048 entries make the small case set
one chunk that never overflows, so the cases here are larger: several chunks, buffer overflow,
> 1024 chunks of ties. The bracket select samples every input, so the small case set reaches all
of its paths and runs here on each of its modes. Needs a GPU and the extension built with its
CUDA kernels; the checks that are not about CUDA alone also run on the "cpp" select on the CPU
(one algorithm), so that their code runs in CI.
"""

import subprocess
import sys

import pytest
import torch

from _cuda_graph import capture
from _oracle import adversarial_inputs
from _select_cases import (CASE_DTYPE, DTYPES, SMALL_CASES, assert_same_selection, check_adversarial,
                           check_batched, check_hints, check_keep_mask, check_list, check_topk_keep_mask,
                           skip_unless_supported)
from bise_kernels.backends import BackendUnavailableError, kernel_table
from bise_kernels.backends import reference as ref

CUDA = torch.cuda.is_available()
DEVICE = "cuda"
ALGOS = ("radix", "bracket", "bracket-miss", "bracket-overflow")
NATIVE = {"cpu": "cpp", "cuda": "cuda"}  # device -> its native backend


def _table(name: str) -> dict:
    try:
        return kernel_table(name)
    except BackendUnavailableError as exc:
        pytest.skip(f"{name} kernels not built: {exc}")


@pytest.fixture(scope="module")
def cuda_kernels():
    if not CUDA:
        pytest.skip("the CUDA select needs a GPU")
    return _table("cuda")


@pytest.fixture(params=[("cpu", None)] + [("cuda", algo) for algo in ALGOS if CUDA],
                ids=lambda target: target[1] or "cpp")
def device(request, monkeypatch):
    """The device of a case: "cuda" once per algorithm BISE_SELECT_CUDA picks; "cpu" (the "cpp" select)."""
    device, algo = request.param
    if algo is not None:
        monkeypatch.setenv("BISE_SELECT_CUDA", algo)
    return device


@pytest.fixture
def kernels(device):
    return _table(NATIVE[device])


@pytest.mark.parametrize("case", list(SMALL_CASES))
@pytest.mark.parametrize("mode", ALGOS[1:])
def test_small_cases_on_the_bracket_select(cuda_kernels, monkeypatch, mode, case):
    skip_unless_supported("cuda", CASE_DTYPE.get(case, torch.float32))
    monkeypatch.setenv("BISE_SELECT_CUDA", mode)
    SMALL_CASES[case](cuda_kernels, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_select_is_bit_identical_on_adversarial_inputs_of_several_chunks(kernels, device, dtype):
    skip_unless_supported(NATIVE[device], dtype)
    n = 100_003
    check_adversarial(kernels, device, n, dtype, (1, 2, n // 2, n - 1, n))


@pytest.mark.parametrize("dtype", DTYPES)
def test_hint_speeds_up_but_never_changes_the_result(kernels, device, dtype):
    skip_unless_supported(NATIVE[device], dtype)
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(3)).to(dtype)
    check_hints(kernels, device, x, 120_000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stale_hint_inside_the_cold_bracket_misses_the_warm_one(kernels, device, dtype):
    """A hint 3000 ranks off: inside the cold bracket (~5800 ranks either side for 300 k scores),
    outside the warm one (~600): the bracket select misses and falls back to the radix select."""
    x = torch.randn(300_000, generator=torch.Generator().manual_seed(8)).to(dtype)
    k = 120_000
    stale = torch.sort(x, descending=True).values[k - 1 + 3000]
    got = kernels["topk_select"]([x.to(device)], k, stale.to(device))
    assert_same_selection(got, ref.topk_select([x], k), "stale hint")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_at_the_cut_overflow_the_buffer(kernels, device, dtype):
    """40% of the scores equal the threshold, which is a bracket end: the bracket holds rank k but
    its candidates overflow the buffer (the fallback); every k through the tie group, also under a
    hint at the threshold (the hinted pass resolves every level, or float64's first 5 of 6)."""
    x = torch.randn(500_000, generator=torch.Generator().manual_seed(9)).to(dtype)
    x[::5] = 0.3
    x[1::5] = 0.3
    above = int((x > 0.3).sum())
    check_list(kernels, device, [x], (above + 1, above + 12_345, above + 200_000))
    check_list(kernels, device, [x], (above + 12_345,), hint=torch.tensor(0.3, dtype=dtype))


def test_global_and_batched_selection_over_several_chunks(kernels, device):
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randint(0, 5, s, generator=g).float() for s in [(3, 50), (7,), (2, 3, 2), (1,), (40_000,)]]
    check_list(kernels, device, tensors, (1, 100, 20_000, 40_170))
    layers = [torch.randn(150_000, generator=g), torch.zeros(9), torch.randint(0, 3, (4, 20), generator=g).float(),
              torch.randn(1, generator=g), torch.rand(70_000, generator=g)]
    ks = [75_000, 4, 33, 1, 12_345]
    check_batched(kernels, device, layers, ks)
    check_batched(kernels, device, layers, ks, hints=torch.tensor([0.0, 0.0, 1.0, 9.0, 0.8]))
    for dtype in (torch.float16, torch.float64):
        check_list(kernels, device, [t.to(dtype) for t in tensors], (1, 20_000))
        check_batched(kernels, device, [t.to(dtype) for t in layers], ks,
                      hints=torch.tensor([0.0, 0.0, 1.0, 9.0, 0.8]).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_unaligned_views_take_the_scalar_loads(kernels, device, dtype):
    """Scores starting 1 and 3 elements past a 16-byte boundary on the device (no 128-bit loads)."""
    g = torch.Generator().manual_seed(10)
    whole = [torch.randn(70_001, generator=g).to(dtype), torch.randint(0, 9, (33_333,), generator=g).to(dtype)]
    views = [whole[0][1:], whole[1][3:]]
    on_device = [whole[0].to(device)[1:], whole[1].to(device)[3:]]
    assert all(t.data_ptr() % 16 != 0 for t in on_device)
    for k in (1, 50_000, 103_330):
        assert_same_selection(kernels["topk_select"](on_device, k, None), ref.topk_select(views, k), k)


def test_tie_cut_over_many_chunks(cuda_kernels):
    """All-equal scores (> 1024 chunks): the radix select's buffer overflows (per-chunk tie counts),
    the bracket select's bracket is the single value (its fused pass's chunk counts)."""
    x = torch.zeros(20_000_000)
    x[::7] = -0.0
    on_device = x.to(DEVICE)
    for k in (1, 12_345_677, 20_000_000):
        want = ref.topk_select([x], k)
        for mode in ALGOS:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("BISE_SELECT_CUDA", mode)
                assert_same_selection(cuda_kernels["topk_select"]([on_device], k, None), want, (mode, k))


def test_non_contiguous_scores_and_keep_mask_over_several_blocks(kernels, device):
    g = torch.Generator().manual_seed(6)
    check_list(kernels, device, [torch.randint(0, 4, (90, 150), generator=g).float().t()], (5000,))
    x = torch.randint(-2, 3, (50, 41), generator=g).float()
    x[0, :7] = -0.0
    check_keep_mask(kernels, device, x, 900, offset=13)
    check_keep_mask(kernels, device, x.double(), 900, offset=13)


def test_unknown_algorithm_is_refused(cuda_kernels, monkeypatch):
    monkeypatch.setenv("BISE_SELECT_CUDA", "quick")
    with pytest.raises(ValueError, match="BISE_SELECT_CUDA"):
        cuda_kernels["topk_select"]([torch.ones(4, device=DEVICE)], 2, None)


def test_topk_keep_mask_on_every_algorithm(kernels, device):
    """topk_keep_mask bit for bit (bracket: masks of the fused pass and the buffer; fallbacks and
    radix: a keep_mask pass): adversarial inputs, a list over several chunks, sorted ties, a hint."""
    g = torch.Generator().manual_seed(21)
    for dtype in (torch.float32, torch.bfloat16):
        for x in adversarial_inputs(100_003, dtype, seed=22).values():
            check_topk_keep_mask(kernels, device, [x], (1, 33_333, 100_003))
    tensors = [torch.randn(40_000, generator=g), torch.zeros(5), torch.randn(30_001, generator=g)[1:].reshape(100, 300)]
    check_topk_keep_mask(kernels, device, tensors, (1, 35_000, 70_005))
    tied = torch.sort(torch.randint(0, 1000, (200_000,), generator=g).float()).values
    check_topk_keep_mask(kernels, device, [tied], (77_777,))
    check_topk_keep_mask(kernels, device, tensors, (35_000,), ref.topk_select(tensors, 35_000)[0])


_DEVICE_ASSERT = """
import sys, torch, bise_kernels as bk
op, hinted = sys.argv[1], sys.argv[2] == "hint"
x = torch.randn(100_003, device="cuda")
x[77_777] = float("nan")
hint = torch.tensor(0.0, device="cuda") if hinted else None
with bk.use_backend("cuda"):
    if op == "topk_keep_mask":
        bk.topk_mask(x, 0.5, hint=hint)
    else:
        bk.topk_threshold(x, 50_000, hint=hint)
    torch.cuda.synchronize()
print("NO ASSERT")
"""


@pytest.mark.parametrize("op", ["topk_select", "topk_keep_mask"])
@pytest.mark.parametrize("hint", ["cold", "hint"])
@pytest.mark.parametrize("mode", ["radix", "bracket"])
def test_nan_scores_assert_on_the_device(cuda_kernels, monkeypatch, mode, hint, op):
    """The first pass's finiteness check (a device-side assert; the API skips its own read for this
    backend) stops the call and names the argument; in a subprocess, as the assert ends the CUDA
    context."""
    monkeypatch.setenv("BISE_SELECT_CUDA", mode)
    done = subprocess.run([sys.executable, "-c", _DEVICE_ASSERT, op, hint], capture_output=True, text=True,
                          timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "NO ASSERT" not in out, out[-2000:]
    assert "device-side assert" in out and "scores contains non-finite values (NaN or inf)" in out, out[-2000:]


_KEEP_DEVICE_ASSERT = """
import sys, torch, bise_kernels as bk
where = sys.argv[1]
layer = bk.MaskedLinear(300, 70, threshold=torch.tensor(float("inf")) if where == "thr" else 0.0, mask_mode="keep",
                        device="cuda")
if where == "scores":
    with torch.no_grad():
        layer.scores.view(-1)[-1] = float("nan")
with bk.use_backend("cuda"):
    layer(torch.randn(3, 300, device="cuda"))
    torch.cuda.synchronize()
print("NO ASSERT")
"""


@pytest.mark.parametrize("where", ["scores", "thr"])
def test_keep_mask_asserts_on_the_device_for_a_keep_layer(cuda_kernels, where):
    """A "keep" mask-mode layer with a threshold leaves the NaN / inf check to keep_mask's kernel
    (check_finite: a device-side assert, no launch of its own); in a subprocess, as the assert ends
    the CUDA context."""
    done = subprocess.run([sys.executable, "-c", _KEEP_DEVICE_ASSERT, where], capture_output=True, text=True,
                          timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "NO ASSERT" not in out, out[-2000:]
    assert "device-side assert" in out, out[-2000:]
    name = "threshold" if where == "thr" else "scores"
    assert name + " contains non-finite values (NaN or inf)" in out, out[-2000:]


@pytest.mark.parametrize("hinted", [False, True], ids=["cold", "hint"])
@pytest.mark.parametrize("mode", ["radix", "bracket"])
def test_topk_keep_mask_of_one_tensor_is_captured_in_a_cuda_graph(cuda_kernels, monkeypatch, mode, hinted):
    """One tensor's topk_keep_mask is captured in a CUDA graph after one warm-up call (the cached
    Plan) on both algorithms (bracket: its one mask is a kernel argument, no address table), and
    each replay selects the scores and hint as they are then."""
    monkeypatch.setenv("BISE_SELECT_CUDA", mode)
    n, k = 100_003, 33_333
    x = torch.randn(n, device=DEVICE)
    hint = torch.zeros((), device=DEVICE) if hinted else None
    graph, (mask,) = capture(lambda: cuda_kernels["topk_keep_mask"]([x], k, hint))
    g = torch.Generator().manual_seed(31)
    for step in range(3):
        scores = torch.randn(n, generator=g)
        scores[::7] = 0.5  # ties at the cut on some steps
        x.copy_(scores)
        if hinted:
            hint.copy_(torch.sort(scores, descending=True).values[k - 1 + 50 * step])  # stale by 0, 50, 100 ranks
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(mask.cpu(), ref.topk_keep_mask([scores], k)[0]), (mode, step)


@pytest.mark.parametrize("mode", ["radix", "bracket"])
def test_a_layerwise_step_over_more_layers_than_64_is_captured_in_a_cuda_graph(cuda_kernels, monkeypatch, mode):
    """One selection per layer of a 100-layer model, warmed up once, then captured: every Plan is found
    in the cache (csrc/cuda/plan_cache.h). The cache that emptied itself at 64 entries missed on every
    lookup past 64 layers, and a miss in a capture is a blocking copy, which CUDA refuses there."""
    monkeypatch.setenv("BISE_SELECT_CUDA", mode)
    layers = [torch.randn(257 + 31 * i, device=DEVICE) for i in range(100)]
    ks = [max(1, t.numel() // 3) for t in layers]
    graph, results = capture(lambda: [cuda_kernels["topk_select"]([t], k, None) for t, k in zip(layers, ks)])
    g = torch.Generator().manual_seed(5)
    for step in range(2):
        fresh = [torch.randn(t.numel(), generator=g) for t in layers]
        for t, f in zip(layers, fresh):
            t.copy_(f)
        graph.replay()
        torch.cuda.synchronize()
        for got, f, k in zip(results, fresh, ks):
            assert_same_selection(got, ref.topk_select([f], k), (mode, step, f.numel()))
