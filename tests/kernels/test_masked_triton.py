"""Triton masked linear / conv2d kernels against the reference backend: outputs and every gradient.

Ragged shapes (not multiples of the tiles), ties at the threshold with a finite cut, both score
granularities and estimators, fp32/fp16/bf16. Under TRITON_INTERPRET=1 on CPU, compiled on a GPU.
Reference values use the same scores and (thr, cut), with the data upcast to fp32.
"""

import pytest
import torch

pytest.importorskip("triton")

from bise_kernels.backends import reference as ref  # noqa: E402
from bise_kernels.backends.triton import masked_conv, masked_linear  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16: the interpreter path upcasts before tl.dot
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=3e-2),
    torch.bfloat16: dict(rtol=3e-2, atol=2e-1),
}
M, K, N = 37, 53, 29  # x (M, K), weight (N, K)


def _close(got, want, dtype):
    assert got is not None and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), **TOL[dtype])


def _tied_scores(shape, density=0.5, dtype=torch.float32, seed=0):
    """Scores with many ties, and the top-k selection nearest to ``density`` whose threshold
    splits a group of tied entries (some kept, some not), so the cut matters."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randint(-2, 3, shape, generator=g) / 2).to(dtype)
    values = torch.sort(scores.reshape(-1), descending=True).values
    splits = [k for k in range(1, values.numel()) if values[k - 1] == values[k]]
    k = min(splits, key=lambda k: abs(k - density * values.numel()))
    thr, cut = ref.topk_select([scores], k)
    ties = scores == thr
    assert 0 < ref.keep_mask(scores, thr, cut)[ties].sum() < ties.sum()
    return scores.to(DEVICE), thr.to(DEVICE), cut.to(DEVICE)


def _data(*shapes, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=DEVICE, dtype=dtype) for s in shapes]


def _f32(*tensors):
    return [None if t is None else t.float() for t in tensors]


# ----------------------------------------------------------------------------- masked linear


def _check_linear(x, w, b, scores, thr, cut, dtype, estimator="ste", needs=(True, True, True, True)):
    y = masked_linear.masked_linear_forward(x, w, b, scores, thr, cut)
    assert y.dtype == dtype
    _close(y, ref.masked_linear_forward(*_f32(x, w, b), scores, thr, cut), dtype)
    grad_y, = _data(y.shape, dtype=dtype, seed=7)
    got = masked_linear.masked_linear_backward(grad_y, x, w, scores, thr, cut, estimator, 0.7, list(needs))
    want = ref.masked_linear_backward(*_f32(grad_y, x, w), scores, thr, cut, estimator, 0.7, list(needs))
    for g, r, needed in zip(got, want, needs):
        if needed:
            _close(g, r, dtype)
        else:
            assert g is None
    if needs[3]:
        assert got[3].dtype == scores.dtype
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator", ["ste", "sigmoid"])
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_masked_linear_matches_reference(granularity, estimator, dtype):
    x, w, b = _data((M, K), (N, K), (N,), dtype=dtype)
    scores, thr, cut = _tied_scores((N, K) if granularity == "weight" else (N,))
    _check_linear(x, w, b, scores, thr, cut, dtype, estimator)


@pytest.mark.parametrize("needs", [(True, False, False, True), (False, False, False, True), (False, True, True, False),
                                   (True, False, True, False), (False, False, True, False), (False, True, False, True)])
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_masked_linear_computes_only_the_needed_gradients(granularity, needs):
    x, w, b = _data((M, K), (N, K), (N,), dtype=torch.float32)
    scores, thr, cut = _tied_scores((N, K) if granularity == "weight" else (N,), seed=2)
    _check_linear(x, w, b, scores, thr, cut, torch.float32, "sigmoid", needs)


def test_masked_linear_batched_input_without_bias_and_half_scores():
    x, w = _data((2, 19, K), (N, K), dtype=torch.float16)
    scores, thr, cut = _tied_scores((N, K), density=0.3, dtype=torch.float16, seed=3)
    _check_linear(x, w, None, scores, thr, cut, torch.float16, "sigmoid")


def test_masked_linear_strided_operands():
    xt, wt = _data((K + 3, M), (K, N), dtype=torch.float32)
    x, w = xt[2:-1].t(), wt.t()  # non-contiguous views
    scores, thr, cut = _tied_scores((K, N), seed=4)
    _check_linear(x, w, None, scores.t(), thr, cut, torch.float32, "sigmoid")


@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_masked_linear_threshold_mode_keeps_every_tie(granularity):
    x, w, b = _data((M, K), (N, K), (N,), dtype=torch.float32)
    scores, _, _ = _tied_scores((N, K) if granularity == "weight" else (N,), seed=5)
    thr = torch.zeros((), device=DEVICE)
    cut = torch.full((), ref.KEEP_ALL_TIES, dtype=torch.int64, device=DEVICE)
    _check_linear(x, w, b, scores, thr, cut, torch.float32, "ste")


def test_masked_linear_dead_unit_tiles_output_bias_only():
    n = 70  # output tiles of 32 units under the interpreter: the first one is all dead
    x, w, b = _data((M, K), (n, K), (n,), dtype=torch.float32)
    scores = torch.arange(n, dtype=torch.float32, device=DEVICE)
    thr, cut = ref.topk_select([scores.cpu()], 30)
    y = masked_linear.masked_linear_forward(x, w, b, scores, thr.to(DEVICE), cut.to(DEVICE))
    assert torch.equal(y[:, :40], b[:40].expand(M, 40))
    _close(y, ref.masked_linear_forward(x, w, b, scores, thr.to(DEVICE), cut.to(DEVICE)), torch.float32)


def test_masked_linear_rejects_bad_input_before_launch():
    x, w, b = _data((M, K), (N, K), (N,), dtype=torch.float32)
    scores, thr, cut = _tied_scores((N, K))
    fwd = masked_linear.masked_linear_forward
    with pytest.raises(TypeError, match="weight has dtype"):
        fwd(x, w.half(), b, scores, thr, cut)
    with pytest.raises(ValueError, match="does not match weight"):
        fwd(x[:, 1:], w, b, scores, thr, cut)
    with pytest.raises(ValueError, match="scores must have"):
        fwd(x, w, b, scores[:, 1:], thr, cut)
    with pytest.raises(ValueError, match="bias must have shape"):
        fwd(x, w, b[1:], scores, thr, cut)
    with pytest.raises(TypeError, match="thr must be"):
        fwd(x, w, b, scores, thr.double(), cut)
    with pytest.raises(TypeError, match="cut must be"):
        fwd(x, w, b, scores, thr, cut.int())
    with pytest.raises(TypeError, match="x must be a floating"):
        fwd(x.int(), w, b, scores, thr, cut)
    with pytest.raises(ValueError, match="grad_y must have shape"):
        masked_linear.masked_linear_backward(x, x, w, scores, thr, cut, "ste", 1.0, [True] * 4)
    with pytest.raises(ValueError, match="estimator"):
        masked_linear.masked_linear_backward(x @ w.t(), x, w, scores, thr, cut, "sign", 1.0, [True] * 4)
    if not CUDA:  # the interpreter runs cpu tensors only; a meta tensor is on no device it can run
        with pytest.raises(ValueError, match="triton backend runs on cuda"):
            fwd(x.to("meta"), w.to("meta"), None, scores.to("meta"), thr.to("meta"), cut.to("meta"))


# ----------------------------------------------------------------------------- masked conv2d

CONV = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)


def _check_conv(x, w, b, scores, thr, cut, dtype, conv, estimator="ste", needs=(True, True, True, True)):
    args = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    y = masked_conv.masked_conv2d_forward(x, w, b, scores, thr, cut, *args)
    _close(y, ref.masked_conv2d_forward(*_f32(x, w, b), scores, thr, cut, *args), dtype)
    grad_y, = _data(y.shape, dtype=dtype, seed=8)
    got = masked_conv.masked_conv2d_backward(grad_y, x, w, scores, thr, cut, *args, estimator, 0.5, list(needs))
    want = ref.masked_conv2d_backward(*_f32(grad_y, x, w), scores, thr, cut, *args, estimator, 0.5, list(needs))
    for g, r, needed in zip(got, want, needs):
        if needed:
            _close(g, r, dtype)
        else:
            assert g is None


@pytest.mark.parametrize("estimator", ["ste", "sigmoid"])
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_masked_conv2d_matches_reference(granularity, estimator):
    x, w, b = _data((2, 6, 9, 11), (10, 3, 3, 2), (10,), dtype=torch.float32)
    scores, thr, cut = _tied_scores(w.shape if granularity == "weight" else (10,), seed=6)
    _check_conv(x, w, b, scores, thr, cut, torch.float32, CONV, estimator)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_conv2d_channels_last(dtype):
    x, w = _data((3, 8, 7, 6), (18, 8, 3, 3), dtype=dtype)
    x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    scores, thr, cut = _tied_scores(w.shape, density=0.4, seed=7)
    _check_conv(x, w, None, scores, thr, cut, dtype, dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1),
                "sigmoid")
    w_eff = masked_conv.masked_weight(w, scores, thr, cut)
    assert w_eff.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(w_eff, w * ref.keep_mask(scores, thr, cut).to(dtype))


@pytest.mark.parametrize("needs", [(True, False, False, True), (False, False, False, True), (False, True, True, False)])
@pytest.mark.parametrize("granularity", ["weight", "unit"])
def test_masked_conv2d_computes_only_the_needed_gradients(granularity, needs):
    x, w, b = _data((2, 6, 9, 11), (10, 3, 3, 2), (10,), dtype=torch.float32)
    scores, thr, cut = _tied_scores(w.shape if granularity == "weight" else (10,), seed=8)
    _check_conv(x, w, b, scores, thr, cut, torch.float32, CONV, "sigmoid", needs)


def test_masked_conv2d_rejects_bad_input_before_launch():
    x, w = _data((2, 6, 9, 11), (10, 3, 3, 2), dtype=torch.float32)
    scores, thr, cut = _tied_scores(w.shape)
    fwd = masked_conv.masked_conv2d_forward
    with pytest.raises(ValueError, match="groups=3"):
        fwd(x, w, None, scores, thr, cut, (1, 1), (0, 0), (1, 1), 3)
    with pytest.raises(ValueError, match="4-d"):
        fwd(x[0], w, None, scores, thr, cut, (1, 1), (0, 0), (1, 1), 2)
    with pytest.raises(TypeError, match="stride"):
        fwd(x, w, None, scores, thr, cut, (1, 1, 1), (0, 0), (1, 1), 2)
    with pytest.raises(ValueError, match="grad_y must have shape"):
        masked_conv.masked_conv2d_backward(x, x, w, scores, thr, cut, (1, 1), (0, 0), (1, 1), 2, "ste", 1.0,
                                           [True] * 4)


# ----------------------------------------------------------------------------- tile selection

_TUNING_FACTS = """
import json, triton
from bise_kernels.backends.triton import _common, masked_linear
facts = {"autotune": _common.AUTOTUNE, "kernels": {}}
for name in ("_masked_mm_kernel", "_masked_wgrad_kernel"):
    k = getattr(masked_linear, name)
    facts["kernels"][name] = {"type": type(k).__name__, "keys": getattr(k, "keys", None),
                              "configs": len(getattr(k, "configs", []))}
facts["heuristic"] = {f"{m},{n},{e}": _common.heuristic_config(m, n, e).all_kwargs()
                      for m, n, e in ((16, 4096, 2), (64, 4096, 2), (4096, 4096, 2), (4096, 4096, 4), (16, 16, 8))}
print(json.dumps(facts))
"""


def _tuning_facts(autotune_env):
    """Tile selection as compiled code sees it (no TRITON_INTERPRET; nothing is launched)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BISE_KERNELS_AUTOTUNE")}
    if autotune_env is not None:
        env["BISE_KERNELS_AUTOTUNE"] = autotune_env
    done = subprocess.run([sys.executable, "-c", _TUNING_FACTS], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_autotune_tries_at_most_four_tiles_keyed_on_size_buckets():
    facts = _tuning_facts(None)
    assert facts["autotune"]
    for name, kernel in facts["kernels"].items():
        assert kernel["type"] == "Autotuner" and 1 <= kernel["configs"] <= 4, (name, kernel)
        assert {"ROWS_BUCKET", "COLS_BUCKET", "LOOP_BUCKET"} <= set(kernel["keys"]), (name, kernel)
        assert not {"ROWS", "COLS", "LOOP"} & set(kernel["keys"]), (name, kernel)  # raw sizes: a compile per shape


def test_autotune_switch_takes_one_heuristic_tile_per_bucket():
    facts = _tuning_facts("0")
    assert not facts["autotune"]
    assert all(kernel["type"] == "Heuristics" for kernel in facts["kernels"].values()), facts["kernels"]
    tiles = facts["heuristic"]
    for key, tile in tiles.items():
        rows, cols, _ = (int(v) for v in key.split(","))
        assert tile["BLOCK_M"] <= rows and (tile["BLOCK_N"] <= cols or tile["BLOCK_N"] == 64), (key, tile)
    assert tiles["16,4096,2"]["BLOCK_M"] == 16  # small M streams the weight
    assert tiles["4096,4096,2"]["BLOCK_M"] == 128 and tiles["4096,4096,2"]["BLOCK_N"] == 256
    assert tiles["4096,4096,4"]["BLOCK_K"] == tiles["4096,4096,2"]["BLOCK_K"] // 2  # fp32 stages fit


def test_size_buckets_are_powers_of_two():
    from bise_kernels.backends.triton._common import prune_matmul_configs, size_bucket

    assert [size_bucket(n) for n in (1, 16, 17, 37, 4096, 4097)] == [16, 16, 32, 64, 4096, 8192]
    import triton

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}) for m, n in ((128, 256), (64, 128), (16, 64))]
    kept = prune_matmul_configs(configs, {"ROWS_BUCKET": 64, "COLS_BUCKET": 4096})
    assert [c.kwargs["BLOCK_M"] for c in kept] == [64, 16]
    assert prune_matmul_configs(configs, {"ROWS_BUCKET": 16, "COLS_BUCKET": 16}) == configs[-1:]
