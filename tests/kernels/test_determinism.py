"""Determinism (docs/ops.md, "Determinism").

* Every public op and module, on every backend that runs on CPU tensors here, runs under
  ``torch.use_deterministic_algorithms(True)``, gives the same bits twice, and the same bits as
  outside the mode: torch then fills every ``at::empty`` / ``torch.empty`` with NaN
  (``torch.utils.deterministic.fill_uninitialized_memory``), so an output a kernel left partly
  unwritten would show.
* The "cpp" kernels give the same bits for any thread count (their reductions are chunked by the
  shape, never by the thread count).
* The Triton kernels add no floats atomically (an order the GPU's scheduling decides): their only
  atomics count integers (the select), and their autotuned GEMMs take the one heuristic tile in
  deterministic mode.
"""

from __future__ import annotations

import contextlib
import pathlib
import re

import pytest
import torch

import bise_kernels as bk
from bise_kernels import backends

from _masked_cases import assert_grads, randn


@contextlib.contextmanager
def deterministic_mode():
    """torch.use_deterministic_algorithms(True), empty tensors filled with NaN; the previous settings after."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


@contextlib.contextmanager
def threads(n):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _tied(*shape, seed=0, device="cpu"):
    """Scores on a coarse grid: many exact ties, so a top-k cuts through a tie group."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-4, 5, shape, generator=g) / 4).float().to(device)


def _leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


def _with_grads(out, leaves, seed=9):
    """out, then each leaf's gradient of sum(out * fixed random weights)."""
    out.backward(randn(*out.shape, seed=seed, dtype=out.dtype, device=out.device))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def _linear(d, structured, n=7, **rule):
    x, w, b = randn(3, n, seed=1, device=d), randn(5, n, seed=2, device=d), randn(5, seed=3, device=d)
    leaves = _leaves(x, w, b, _tied(*((5,) if structured else (5, n)), device=d))
    return _with_grads(bk.masked_linear(*leaves, **rule), leaves)


def _conv(d, structured, c=4, **rule):
    x, w, b = randn(2, c, 6, 5, seed=1, device=d), randn(6, c // 2, 3, 3, seed=2, device=d), randn(6, seed=3, device=d)
    leaves = _leaves(x, w, b, _tied(*((6,) if structured else (6, c // 2, 3, 3)), device=d))
    return _with_grads(bk.masked_conv2d(*leaves, stride=(2, 1), padding=1, groups=2, **rule), leaves)


def _gate(d, channels_last, shape=(2, 3, 4, 5), **rule):
    x = randn(*shape, seed=1, device=d)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    leaves = _leaves(x, _tied(shape[1], device=d))
    return _with_grads(bk.channel_gate(*leaves, **rule), leaves)


def _module(d, make, x):
    torch.manual_seed(0)
    layer = make().to(d)
    with torch.no_grad():
        layer.scores.copy_(_tied(*layer.scores.shape, seed=4))
    x = x.to(d).requires_grad_(True)
    out = _with_grads(layer(x), [x])
    return out + [p.grad for p in layer.parameters() if p.requires_grad] + [layer.mask()]


def _global_model(d):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(16, 3)).to(d)
    scores = bk.mask_model(model, density=0.4, scope="global", score_init=0.0)
    with torch.no_grad():
        for i, s in enumerate(scores):
            s.copy_(_tied(*s.shape, seed=i))
    return _with_grads(model(randn(2, 3, 4, 4, seed=5, device=d)), scores)


def _two(d, first=30, second=(2, 9)):
    return [_tied(first, device=d), _tied(*second, seed=1, device=d)]


CASES = {  # name -> case(device): the outputs and gradients of one call, on fresh inputs
    "topk_threshold": lambda d: [bk.topk_threshold(_tied(40, device=d), 13)],
    "topk_select": lambda d: list(bk.topk_select(_two(d), 20)),
    "topk_mask": lambda d: [bk.topk_mask(_tied(6, 7, device=d), 0.3)],
    "global_topk_masks": lambda d: bk.global_topk_masks(_two(d), 0.4),
    "layerwise_topk_masks": lambda d: bk.layerwise_topk_masks(_two(d), [0.4, 0.7]),
    "masked_linear-weight-density": lambda d: _linear(d, False, density=0.5),
    "masked_linear-unit-threshold-sigmoid": lambda d: _linear(d, True, threshold=0.0, estimator="sigmoid",
                                                              temperature=0.7),
    "masked_conv2d-weight-threshold": lambda d: _conv(d, False, threshold=0.25),
    "masked_conv2d-unit-density-sigmoid": lambda d: _conv(d, True, density=0.5, estimator="sigmoid"),
    "channel_gate": lambda d: _gate(d, False),
    "channel_gate-channels_last-density": lambda d: _gate(d, True, density=0.5, estimator="ste"),
    "MaskedLinear-keep": lambda d: _module(d, lambda: bk.MaskedLinear(7, 5, density=0.5, mask_mode="keep"),
                                           randn(3, 7, seed=1)),
    "MaskedLinear-channel-selection": lambda d: _module(
        d, lambda: bk.MaskedLinear(7, 5, granularity="channel", threshold=0.0, mask_mode="selection"),
        randn(3, 7, seed=1)),
    "MaskedConv2d-keep": lambda d: _module(
        d, lambda: bk.MaskedConv2d(4, 6, 3, padding=1, density=0.5, mask_mode="keep"), randn(2, 4, 5, 5, seed=1)),
    "ChannelGate": lambda d: _module(d, lambda: bk.ChannelGate(3, temperature=0.5), randn(2, 3, 4, 4, seed=1)),
    "mask_model-global": _global_model,
}

BIG_CASES = {  # GPU only: many blocks / programs per reduction and per selection
    "topk_select-4M": lambda d: list(bk.topk_select(_two(d, 1 << 22, (3, 1 << 20)), 1 << 21)),
    "layerwise_topk_masks-4M": lambda d: bk.layerwise_topk_masks(_two(d, 1 << 22, (3, 1 << 20)), [0.3, 0.6]),
    "masked_linear-unit-4096": lambda d: _linear(d, True, n=4096, density=0.5, estimator="sigmoid"),
    "masked_conv2d-unit-256": lambda d: _conv(d, True, c=256, density=0.5),
    "channel_gate-large": lambda d: _gate(d, False, shape=(64, 32, 56, 56), estimator="sigmoid"),
    "channel_gate-channels_last-large": lambda d: _gate(d, True, shape=(64, 32, 56, 56), estimator="sigmoid"),
}


def _bits(t):
    """A tensor as comparable bits (NaN equal to itself, -0.0 not to 0.0)."""
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t


def _assert_same_bits(got, want, what):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{what}: output {i}"
        assert torch.equal(_bits(g), _bits(w)), f"{what}: output {i} differs"


@pytest.mark.parametrize("case", CASES)
def test_public_ops_are_deterministic_under_torch_deterministic_mode(backend, case):
    want = CASES[case]("cpu")  # outside the mode
    with deterministic_mode():
        first, second = CASES[case]("cpu"), CASES[case]("cpu")
    _assert_same_bits(first, second, "two calls in deterministic mode")
    _assert_same_bits(first, want, "deterministic mode against outside it")


GPU_BACKENDS = [name for name in ("torch", "cuda", "triton")
                if torch.cuda.is_available() and name in backends.available_backends("cuda")]


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA device")
@pytest.mark.parametrize("name", GPU_BACKENDS or ["cuda"])
@pytest.mark.parametrize("case", [*CASES, *BIG_CASES])
def test_public_ops_on_cuda_are_bit_identical_twice_in_deterministic_mode(name, case, monkeypatch):
    """Two calls give the same bits (against a call outside the mode they may not: there cuDNN may take
    another algorithm, and Triton its autotuned tile). The torch error the mode raises for cuBLAS
    without a workspace setting is torch's; the variable lets the dense GEMMs run."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    run = {**CASES, **BIG_CASES}[case]
    with bk.use_backend(name), deterministic_mode():
        first, second = run("cuda"), run("cuda")
    _assert_same_bits(first, second, f"{name}: two calls in deterministic mode")


# ----------------------------------------------------------------------------- cpp: any thread count

THREAD_COUNTS = (1, 2, 3)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
needs_cpp = pytest.mark.skipif("cpp" not in backends.available_backends("cpu"), reason="the C++ extension is not built")


def _same_for_thread_counts(compute):
    """compute() (fresh tensors each call) gives the same bits under every count of THREAD_COUNTS."""
    results = []
    for n in THREAD_COUNTS:
        with threads(n):
            results.append(compute())
    for n, got in zip(THREAD_COUNTS[1:], results[1:]):
        _assert_same_bits(got, results[0], f"{n} threads against {THREAD_COUNTS[0]}")


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_selects_are_the_same_for_any_thread_count(dtype):
    """Past 1 M scores the selects and keep_mask split their passes into per-thread chunks."""
    ext = torch.ops.bise_kernels_ext
    big, small = randn((1 << 21) + 77, dtype=dtype, seed=1), randn(5000, dtype=dtype, seed=2)
    k = big.numel() // 3

    def compute():
        thr, cut = ext.topk_select([big, small], k, None)
        hinted = ext.topk_select([big], k, thr * 1.01)
        thrs, cuts = ext.batched_topk_select([big, small, big[:70000]], [k, 10, 300], None)
        return [thr, cut, *hinted, thrs, cuts, *ext.topk_keep_mask([big, small], k, None),
                ext.keep_mask(big, thr, cut, 0, True)]

    _same_for_thread_counts(compute)


@needs_cpp
@pytest.mark.parametrize("structured", [False, True], ids=["weight", "unit"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_masked_passes_are_the_same_for_any_thread_count(dtype, structured):
    """masked_weight / keep_weight / the score gradients (both mask modes, both estimators) of a weight
    large enough for several chunks (32 K elements each; per-unit: rows)."""
    ext = torch.ops.bise_kernels_ext
    w, grad = randn(300, 257, dtype=dtype, seed=1), randn(300, 257, dtype=dtype, seed=2)
    scores = randn(*((300,) if structured else (300, 257)), dtype=dtype, seed=3)
    thr, cut = ext.topk_select([scores], scores.numel() // 2, None)
    keep = ext.keep_mask(scores, thr, cut, 0, False)

    def compute():
        out = [ext.masked_weight(w, scores, thr, cut, True), ext.keep_weight(w, keep)]
        for estimator, temperature in (("ste", 1.0), ("sigmoid", 0.7)):
            g = grad.clone()
            out += [ext.masked_score_grad(g, w, scores, thr, cut, estimator, temperature, True, True), g]
            g = grad.clone()
            out += [ext.keep_score_grad(g, w, scores, keep, estimator, temperature, True, True), g]
        return out

    _same_for_thread_counts(compute)


GATE_SHAPES = {  # one chunk (under 32 K elements), then several (csrc/cpu/gate.cpp: one per 32 K, by the shape)
    "long_inner": (256, 3, 40), "short_inner": (2048, 5, 3), "channels_last": (64, 6, 5, 5),
    "long_inner-2_chunks": (64, 2, 1024), "short_inner-3_chunks": (8191, 5, 3),  # 8191 rows: uneven chunks
    "channels_last-4_chunks": (64, 8, 16, 16),
}


@needs_cpp
@pytest.mark.parametrize("layout", GATE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_channel_gate_is_the_same_for_any_thread_count(dtype, layout):
    """The backward's per-channel sums over (outer, inner): per (chunk, channel) runs (inner >= 16) or
    per chunk of outer rows (inner < 16), summed in a fixed order; the reference's values (the sums of
    several chunks were compared with it at no test shape)."""
    ext = torch.ops.bise_kernels_ext
    shape = GATE_SHAPES[layout]
    x, gy = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
    if layout.startswith("channels_last"):
        x, gy = (t.to(memory_format=torch.channels_last) for t in (x, gy))
    scores = randn(shape[1], seed=3).to(dtype)
    thr, cut = ext.topk_select([scores], shape[1] // 2 + 1, None)

    def compute():
        return [ext.channel_gate_forward(x, scores, thr, cut, 1),
                *ext.channel_gate_backward(gy, x, scores, thr, cut, 1, "sigmoid", 0.7, True, True)]

    _same_for_thread_counts(compute)
    want = backends.kernel_table("torch")["channel_gate_backward"](gy, x, scores, thr, cut, 1, "sigmoid", 0.7,
                                                                   [True, True])
    assert_grads(compute()[1:], want, dtype)


# ----------------------------------------------------------------------------- Triton

TRITON = pathlib.Path(backends.__file__).parent / "triton"


def test_triton_kernels_add_no_floats_atomically():
    """Floats added atomically sum in the order the GPU schedules the programs: the structured score
    gradients and the channel gate's store per-program partial sums, summed in a fixed order after.
    The select's atomics count integers (histograms, buffer slots, tickets, tie counts)."""
    atomics = {path.name: len(re.findall(r"\btl\.atomic_(?:add|xchg|cas)\(", path.read_text()))
               for path in sorted(TRITON.glob("*.py"))}
    assert {name for name, n in atomics.items() if n} == {"select.py"}, atomics


def test_triton_gemms_take_the_heuristic_tile_in_deterministic_mode(monkeypatch):
    """Autotuning keeps the tile that timed fastest in this process, which another run may not pick,
    and the tile's BLOCK_K orders the sums: deterministic mode launches the heuristic tile instead.
    (masked_linear's GEMMs are made by matmul_tuning and launched through tile_for_mode.)"""
    triton = pytest.importorskip("triton")
    from bise_kernels.backends.triton import _common

    monkeypatch.setattr(_common, "AUTOTUNE", True)  # the interpreter never autotunes

    @_common.matmul_tuning(key=["ROWS_BUCKET"], staged=lambda args: ())
    @triton.jit
    def gemm(ROWS_BUCKET, COLS_BUCKET, LOOP_BUCKET):
        pass

    assert type(_common.tile_for_mode(gemm)).__name__ == "Autotuner"
    with deterministic_mode():
        assert type(_common.tile_for_mode(gemm)).__name__ == "Heuristics"


def test_every_triton_gemm_launch_takes_the_tile_of_the_mode():
    """The test above checks tile_for_mode; this one that every launch of a matmul_tuning GEMM (the
    masked-linear forward, dgrad and wgrad, gridded by _mm_grid) goes through it: a GEMM launched as
    ``kernel[grid]`` would keep the autotuned tile in deterministic mode."""
    launches = {path.name: re.findall(r"(\S+)\[_mm_grid\(", path.read_text()) for path in sorted(TRITON.glob("*.py"))}
    launches = {name: found for name, found in launches.items() if found}
    assert launches and all(launch.startswith("tile_for_mode(") for found in launches.values() for launch in found), \
        launches


needs_triton = pytest.mark.skipif("triton" not in backends.available_backends("cpu"),
                                  reason="the Triton backend runs on CPU tensors only with TRITON_INTERPRET=1")


def _partial_sum_cases(dtype):
    """A structured score gradient summed over several programs' partial rows, per kernel."""
    ref = backends.kernel_table("torch")
    cases = {}
    x, w = randn(4, 100, dtype=dtype, seed=1), randn(6, 100, dtype=dtype, seed=2)  # 4 column tiles of 32
    scores = randn(6, seed=3).to(dtype)
    thr, cut = ref["topk_select"]([scores], 4)
    cases["masked_linear"] = ("masked_linear_backward",
                              (randn(4, 6, dtype=dtype, seed=4), x, w, scores, thr, cut, "sigmoid", 0.7,
                               [False, False, False, True]))
    x, w = randn(2, 8, 5, 5, dtype=dtype, seed=1), randn(6, 8, 3, 3, dtype=dtype, seed=2)  # 72 reds: 2 programs
    cases["masked_conv2d"] = ("masked_conv2d_backward",
                              (randn(2, 6, 3, 3, dtype=dtype, seed=4), x, w, scores, thr, cut, [1, 1], [0, 0],
                               [1, 1], 1, "ste", 1.0, [False, False, False, True]))
    gate_scores = randn(3, seed=3).to(dtype)
    gthr, gcut = ref["topk_select"]([gate_scores], 2)
    for name, x in (("gate_long_inner", randn(2, 3, 2100, dtype=dtype, seed=1)),  # grid (2, 2)
                    ("gate_channels_last", randn(100, 3, 5, 5, dtype=dtype, seed=1).to(  # grid (1, 3)
                        memory_format=torch.channels_last))):
        cases[name] = ("channel_gate_backward",
                       (randn(*x.shape, dtype=dtype, seed=4).to(memory_format=torch.channels_last)
                        if x.dim() == 4 else randn(*x.shape, dtype=dtype, seed=4),
                        x, gate_scores, gthr, gcut, 1, "sigmoid", 0.7, [False, True]))
    return cases


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_partial_sums_match_the_reference(dtype):
    """The per-program partial rows of the structured score gradients add up to the reference's sums,
    the same bits twice."""
    triton_kernels, ref = backends.kernel_table("triton"), backends.kernel_table("torch")
    for name, (kernel, args) in _partial_sum_cases(dtype).items():
        got = triton_kernels[kernel](*args)[-1]
        _assert_same_bits([triton_kernels[kernel](*args)[-1]], [got], name)
        want = ref[kernel](*args)[-1]
        tolerance = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, want, **tolerance, msg=name)
