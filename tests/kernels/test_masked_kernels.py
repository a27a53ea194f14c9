"""Every backend's masked linear / conv2d and channel-gate kernels against the reference backend:
outputs and every gradient (cases: _masked_cases.py), then the public API with each backend.
Backend files add only what is theirs (test_masked_triton.py, test_masked_cuda.py; the native
ops' argument errors: test_native_checks.py)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import bise_kernels as bk
from _masked_cases import (ALL_NEEDS, CONV_CASES, DTYPES, ESTIMATORS, GATE_LAYOUTS, assert_grads, check_conv,
                           check_gate, check_linear, randn, tied_scores, tol)
from bise_kernels.backends import reference as R

# ----------------------------------------------------------------------------- masked linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("estimator,temperature", ESTIMATORS)
def test_masked_linear_matches_reference(kernels, dtype, structured, estimator, temperature):
    check_linear(kernels, kernels.device, dtype, structured, estimator, temperature)


def _no_in_features(structured, device="cpu", x_shape=(2, 3, 0)):
    """x, weight, bias, scores and a selection of a linear layer with in_features 0."""
    x, w, b = randn(*x_shape, seed=1, device=device), randn(4, 0, device=device), randn(4, seed=2, device=device)
    scores = randn(*((4,) if structured else (4, 0)), seed=3, device=device)
    thr, cut = torch.zeros((), device=device), torch.zeros((), dtype=torch.int64, device=device)
    return x, w, b, scores, thr, cut


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("keep", [False, True], ids=["selection", "keep"])
def test_masked_linear_without_in_features_matches_reference(kernels, structured, keep):
    """in_features 0: the reference is F.linear (bias only; gradients of their tensors' shapes, the scores'
    zero), and every backend's kernels, forward and backward, give it (all failed: reshape(-1, 0))."""
    x, w, b, scores, thr, cut = _no_in_features(structured, kernels.device)
    grad_y = randn(2, 3, 4, seed=5, device=kernels.device)
    mask = R.keep_mask(scores, thr, cut)
    if keep:
        fwd, bwd = ("masked_linear_keep_forward", (x, w, b, mask)), ("masked_linear_keep_backward", (mask,))
    else:
        fwd, bwd = ("masked_linear_forward", (x, w, b, scores, thr, cut)), ("masked_linear_backward", (thr, cut))
    want = R.__dict__[fwd[0]](*fwd[1])
    torch.testing.assert_close(want, F.linear(x, w, b), rtol=0, atol=0)
    torch.testing.assert_close(getattr(kernels, fwd[0])(*fwd[1]), want, rtol=0, atol=0)
    args = (grad_y, x, w, scores, *bwd[1], "sigmoid", 0.5, ALL_NEEDS)
    expected = R.__dict__[bwd[0]](*args)
    assert torch.equal(expected[3], torch.zeros_like(scores)) and torch.equal(expected[2], grad_y.sum((0, 1)))
    assert_grads(getattr(kernels, bwd[0])(*args), expected, torch.float32)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("rule", [{"density": 0.5}, {"threshold": 0.0}], ids=["density", "threshold"])
@pytest.mark.parametrize("x_shape", [(3, 0), (0,)], ids=["2d", "1d"])
def test_public_masked_linear_without_in_features(backend, structured, rule, x_shape):
    """bk.masked_linear with in_features 0 is F.linear on every backend, its top-k over no scores keeping
    k = 0 (empty weight-shaped scores: "scores is empty" before; per-unit ones failed in the backward)."""
    x, w, b, scores, _, _ = _no_in_features(structured, x_shape=x_shape)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, scores)]
    y = bk.masked_linear(*leaves, **rule)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=0, atol=0)
    grads = torch.autograd.grad(y.square().sum(), leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    torch.testing.assert_close(grads[2], 2 * y.detach().reshape(-1, 4).sum(0), rtol=0, atol=0)
    assert not grads[0].any() and not grads[1].any() and not grads[3].any()


@pytest.mark.parametrize("path", ["custom_op", "compiled"])
@pytest.mark.parametrize("keep", [False, True], ids=["selection", "keep"])
def test_masked_linear_without_in_features_through_the_custom_ops(backend, path, keep):
    """The custom ops (what torch.compile, export and opcheck see) and their fake impls with in_features 0: the
    bias gradient's stand-in was ``weight[:, 0]``, an IndexError there."""
    from bise_kernels import _ops

    x, w, b, scores, thr, cut = _no_in_features(False)
    keep_mask = R.keep_mask(scores, thr, cut)
    if keep:
        def fn(x, w, b, s):
            return _ops.masked_linear_keep.op(x, w, b, s, keep_mask, "ste", 1.0)
    else:
        def fn(x, w, b, s):
            return _ops.masked_linear.op(x, w, b, s, thr, cut, "ste", 1.0)
    if path == "compiled":
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, scores)]
    y = fn(*leaves)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=0, atol=0)
    grads = torch.autograd.grad(y.square().sum(), leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    torch.testing.assert_close(grads[2], 2 * y.detach().reshape(-1, 4).sum(0), rtol=0, atol=0)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("rule", [{"density": 0.5}, {"threshold": 0.0}], ids=["density", "threshold"])
def test_a_masked_conv_without_in_channels_is_refused(backend, rule, structured):
    """Only the masked linear computes with an empty weight (F.linear's result); a conv's is a named error before
    the forward (weight-shaped scores: it passed there and failed in the backward; per-unit ones failed there
    before this test too)."""
    x, w, b = torch.randn(2, 0, 5, 5), torch.randn(4, 0, 3, 3), torch.randn(4)
    s = torch.randn(4) if structured else torch.randn(4, 0, 3, 3)
    with pytest.raises(ValueError, match=r"weight of shape \(4, 0, 3, 3\) is empty"):
        bk.masked_conv2d(x, w, b, s, **rule)
    from bise_kernels import _ops

    with pytest.raises(ValueError, match=r"weight of shape .4, 0, 3, 3. is empty"):  # the packed-mask op too (C++)
        _ops.masked_conv2d_keep.op(x, w, b, s, s > 0, [1, 1], [0, 0], [1, 1], 1, "ste", 1.0)


@pytest.mark.parametrize("needs", [n for n in itertools.product([False, True], repeat=4) if any(n)])
@pytest.mark.parametrize("structured", [False, True])
def test_masked_linear_computes_only_needed_gradients(kernels, needs, structured):
    check_linear(kernels, kernels.device, torch.float32, structured, "sigmoid", 2.0, needs)


@pytest.mark.parametrize("score_dtype", [torch.float64, torch.float16])
def test_masked_linear_scores_in_another_dtype(kernels, score_dtype):
    device = kernels.device
    x, w = randn(6, 11, dtype=torch.bfloat16, seed=1, device=device), randn(9, 11, dtype=torch.bfloat16, seed=2,
                                                                           device=device)
    scores, thr, cut = tied_scores((9, 11), score_dtype, seed=3, device=device)
    torch.testing.assert_close(kernels.masked_linear_forward(x, w, None, scores, thr, cut),
                               R.masked_linear_forward(x, w, None, scores, thr, cut), **tol(torch.bfloat16))
    args = (randn(6, 9, dtype=torch.bfloat16, seed=4, device=device), x, w, scores, thr, cut, "sigmoid", 1.0,
            ALL_NEEDS)
    got, want = kernels.masked_linear_backward(*args), R.masked_linear_backward(*args)
    assert_grads(got[:3], want[:3], torch.bfloat16)
    assert got[3].dtype == score_dtype
    torch.testing.assert_close(got[3], want[3], rtol=2e-2, atol=2e-2)


def test_masked_linear_strided_operands(kernels):
    device = kernels.device
    xt, wt = randn(26, 37, seed=1, device=device), randn(23, 29, seed=2, device=device)
    x, w = xt[2:-1].t(), wt.t()  # non-contiguous views: x (37, 23), w (29, 23)
    scores, thr, cut = tied_scores((23, 29), seed=3, device=device)
    scores = scores.t()  # (29, 23), column-major
    torch.testing.assert_close(kernels.masked_linear_forward(x, w, None, scores, thr, cut),
                               R.masked_linear_forward(x, w, None, scores, thr, cut), **tol(torch.float32))
    args = (randn(29, 37, seed=4, device=device).t(), x, w, scores, thr, cut, "sigmoid", 0.7, ALL_NEEDS)
    assert_grads(kernels.masked_linear_backward(*args), R.masked_linear_backward(*args), torch.float32)



@pytest.mark.parametrize("bias_layout", ["sliced", "expanded"])
@pytest.mark.parametrize("structured", [False, True])
def test_masked_linear_strided_bias(kernels, bias_layout, structured):
    """A bias view with stride 2 or 0 (expand) reads its own elements (the kernels index it by stride)."""
    device = kernels.device
    x, w = randn(5, 8, seed=1, device=device), randn(6, 8, seed=2, device=device)
    bias = randn(12, seed=3, device=device)[::2] if bias_layout == "sliced" else randn(1, seed=3, device=device).expand(6)
    scores, thr, cut = tied_scores((6,) if structured else (6, 8), seed=4, device=device)
    torch.testing.assert_close(kernels.masked_linear_forward(x, w, bias, scores, thr, cut),
                               R.masked_linear_forward(x, w, bias, scores, thr, cut), **tol(torch.float32))
    if hasattr(kernels, "masked_linear_keep_forward"):
        keep = R.keep_mask(scores, thr, cut)
        torch.testing.assert_close(kernels.masked_linear_keep_forward(x, w, bias, keep),
                                   R.masked_linear_keep_forward(x, w, bias, keep), **tol(torch.float32))

@pytest.mark.parametrize("structured", [False, True])
def test_threshold_mode_keeps_all_ties(kernels, structured):
    device = kernels.device
    x, w = randn(4, 10, seed=1, device=device), randn(6, 10, seed=2, device=device)
    scores, _, _ = tied_scores((6,) if structured else (6, 10), seed=3, device=device)
    thr = torch.tensor(0.0, device=device)
    cut = torch.tensor(R.KEEP_ALL_TIES, device=device)
    keep = scores >= 0
    want = F.linear(x, w * (keep[:, None] if structured else keep))
    torch.testing.assert_close(kernels.masked_linear_forward(x, w, None, scores, thr, cut), want, **tol(torch.float32))


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("cut", [1, 150, 299])
def test_the_tie_at_index_cut_is_dropped(kernels, structured, cut):
    """Every score tied at thr: exactly the indices below cut are kept, the tie at index cut is not
    (the fused passes split their ranges at cut; an off-by-one there keeps one weight too many)."""
    device = kernels.device
    x, w = randn(4, 30, seed=1, device=device), randn(10, 30, seed=2, device=device)
    scores = torch.full((10,) if structured else (10, 30), 0.5, device=device)
    cut = min(cut, scores.numel() - 1)
    thr, cut_t = torch.tensor(0.5, device=device), torch.tensor(cut, device=device)
    keep = torch.arange(scores.numel(), device=device).reshape(scores.shape) < cut
    want = F.linear(x, w * (keep[:, None] if structured else keep))
    y = kernels.masked_linear_forward(x, w, None, scores, thr, cut_t)
    torch.testing.assert_close(y, want, **tol(torch.float32))
    torch.testing.assert_close(y, R.masked_linear_forward(x, w, None, scores, thr, cut_t), **tol(torch.float32))
    args = (randn(4, 10, seed=3, device=device), x, w, scores, thr, cut_t, "ste", 1.0, ALL_NEEDS)
    assert_grads(kernels.masked_linear_backward(*args), R.masked_linear_backward(*args), torch.float32)


# ----------------------------------------------------------------------------- masked conv2d


@pytest.mark.parametrize("conv_case", CONV_CASES)
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_conv2d_matches_reference(kernels, conv_case, structured, channels_last):
    check_conv(kernels, kernels.device, torch.float32, conv_case, structured, channels_last)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("needs", [[True, False, False, True], [False, True, True, False], ALL_NEEDS])
def test_masked_conv2d_dtypes_and_needs(kernels, dtype, needs):
    check_conv(kernels, kernels.device, dtype, CONV_CASES[2], False, False, needs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", ["linear", "linear_keep", "conv2d", "conv2d_keep"])
def test_frozen_weight_ste_score_gradient_is_the_references_to_the_bit(kernels, layer, dtype):
    """Masked training's usual case: weight frozen, scores of the weight's shape and dtype, "ste". The
    native backends take the dense ATen weight gradient as the reference does and multiply it by W in
    place (csrc/masked_autograd.cpp): the same bits. (Triton's GEMMs round differently: close.)"""
    if kernels.name == "triton" and kernels.device == "cpu" and dtype == torch.bfloat16:  # cpu: interpreted
        pytest.skip("bf16 tl.dot is wrong under the interpreter")
    device, needs = kernels.device, [True, False, True, True]
    conv = layer.startswith("conv")
    x = randn(*((2, 6, 9, 11) if conv else (2, 3, 37)), dtype=dtype, seed=1, device=device)
    w = randn(*((9, 6, 3, 2) if conv else (29, 37)), dtype=dtype, seed=2, device=device)
    scores, thr, cut = tied_scores(w.shape, dtype, seed=4, device=device)
    geometry = ([1, 2], [1, 0], [1, 1], 1) if conv else ()
    op = "masked_conv2d" if conv else "masked_linear"
    want_y = getattr(R, f"{op}_forward")(x, w, None, scores, thr, cut, *geometry)
    mask = (R.keep_mask(scores, thr, cut),) if layer.endswith("keep") else (thr, cut)
    backward = f"{op}_keep_backward" if layer.endswith("keep") else f"{op}_backward"
    args = (randn(*want_y.shape, dtype=dtype, seed=5, device=device), x, w, scores, *mask, *geometry, "ste", 1.0,
            needs)
    if not hasattr(kernels, backward):
        pytest.skip(f"backend {kernels.name!r} has no {backward} kernel")
    got, want = getattr(kernels, backward)(*args), getattr(R, backward)(*args)
    if kernels.name == "triton":
        assert_grads(got, want, dtype)
        return
    assert got[1] is None and want[1] is None
    for i in (0, 2, 3):
        assert got[i].dtype == want[i].dtype and torch.equal(got[i], want[i]), f"gradient {i}"


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_frozen_weight_ste_score_gradient_with_scores_of_another_dtype(kernels, layer, weight_dtype):
    """float32 scores on a weight of another dtype (MaskedLinear.from_dense of a bf16 layer): the score
    gradient is the float32 product of grad_W_eff and W, in the scores' dtype; the native shortcut
    for frozen weights (one in-place product in the weight's dtype, csrc/masked_autograd.cpp) must
    not take this case."""
    if kernels.name == "triton" and kernels.device == "cpu" and weight_dtype == torch.bfloat16:  # cpu: interpreted
        pytest.skip("bf16 tl.dot is wrong under the interpreter")
    device, needs = kernels.device, [True, False, True, True]
    conv = layer == "conv2d"
    x = randn(*((2, 6, 9, 11) if conv else (2, 3, 37)), dtype=weight_dtype, seed=1, device=device)
    w = randn(*((9, 6, 3, 2) if conv else (29, 37)), dtype=weight_dtype, seed=2, device=device)
    scores, thr, cut = tied_scores(w.shape, torch.float32, seed=4, device=device)
    geometry = ([1, 2], [1, 0], [1, 1], 1) if conv else ()
    op = f"masked_{layer}"
    want_y = getattr(R, f"{op}_forward")(x, w, None, scores, thr, cut, *geometry)
    args = (randn(*want_y.shape, dtype=weight_dtype, seed=5, device=device), x, w, scores, thr, cut, *geometry,
            "ste", 1.0, needs)
    got, want = getattr(kernels, f"{op}_backward")(*args), getattr(R, f"{op}_backward")(*args)
    assert got[3].dtype == torch.float32 and got[3].shape == scores.shape
    if kernels.name == "triton":
        assert_grads(got, want, weight_dtype)
        return
    assert got[1] is None
    for i in (0, 2, 3):
        assert torch.equal(got[i], want[i]), f"gradient {i}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_the_reference_sigmoid_slope_is_the_exact_one_rounded_once(dtype):
    """The oracle of every backend's "sigmoid" score gradient: sigmoid'(s/T)/T in float32 for half scores,
    then rounded once to their dtype, within 1 ulp of the float64 value. In the half dtype itself (s/T and
    1 - sigmoid rounded to 8 or 11 bits) it was off by many ulps at T = 0.05, and the kernels compared with it
    only to the half dtype's loose tolerances. The layer and gate backwards are given unit products
    (x, weight and grad_y of ones), so their score gradient is the slope."""
    temperature, n = 0.05, 161
    scores = torch.linspace(-0.4, 0.4, n).to(dtype)  # s / T in [-8, 8]
    sig = torch.sigmoid(scores.double() / temperature)
    exact = sig * (1 - sig) / temperature
    slope = R.score_slope(scores, "sigmoid", temperature)
    assert slope.dtype == torch.float32
    torch.testing.assert_close(slope.double(), exact, rtol=5e-4, atol=0)  # 1 - sigmoid(8) cancels in float32
    ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(exact)))  # of the rounded value (normal)
    ones = lambda *shape: torch.ones(shape, dtype=dtype)  # noqa: E731
    thr, cut = torch.tensor(-1.0, dtype=dtype), torch.tensor(2**62)  # every weight kept
    grads = {
        "linear": R.masked_linear_backward(ones(1, n), ones(1, 1), ones(n, 1), scores.reshape(n, 1), thr, cut,
                                           "sigmoid", temperature, [False, False, False, True])[3].reshape(n),
        "linear_structured": R.masked_linear_backward(ones(1, n), ones(1, 1), ones(n, 1), scores, thr, cut,
                                                      "sigmoid", temperature, [False, False, False, True])[3],
        "gate": R.channel_gate_backward(ones(1, n), ones(1, n), scores, thr, cut, 1, "sigmoid", temperature,
                                        [False, True])[1],
    }
    for name, got in grads.items():
        assert got.dtype == dtype, name
        err = (got.double() - exact).abs() / ulp
        assert int((err > 1).sum()) == 0, f"{name}: off by up to {float(err.max()):.1f} ulp"


def _subnormal(shape, seed, device):
    """float32 multiples of the smallest subnormal in [-3, 3] (sums of a few are exact in any order),
    with +-0.0 among them."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-3, 4, shape, generator=g).double() * torch.finfo(torch.float32).smallest_normal / 4
    return values.float().to(device)


def test_subnormal_weights_scores_and_products_are_not_flushed_to_zero(kernels):
    """A subnormal score above a zero threshold is kept, a subnormal weight passes the gate unchanged,
    and subnormal products reach the score gradient: the reference's IEEE arithmetic (the CUDA passes
    compile without --use_fast_math, which flushes all three to zero). Native kernels, to the bit;
    the GEMM operands here are 0 and 1, so the dense GEMM adds no rounding of its own."""
    if kernels.name == "triton":
        pytest.skip("Triton's own compiler decides its denormal mode; this checks the native passes")
    device = kernels.device
    tiny = torch.finfo(torch.float32).smallest_normal / 4
    scores = _subnormal((5, 8), seed=1, device=device)
    thr, cut = torch.tensor(0.0, device=device), torch.tensor(0, device=device)
    weight = _subnormal((5, 8), seed=2, device=device)
    assert bool((scores == tiny).any()) and bool((weight != 0).any())
    x, grad_y = torch.eye(8, device=device), torch.ones(8, 5, device=device)
    args = (grad_y, x, weight, scores, thr, cut, "ste", 1.0, [False, True, False, True])
    got, want = kernels.masked_linear_backward(*args), R.masked_linear_backward(*args)
    assert torch.equal(want[1], (scores > 0).float()) and torch.equal(want[3], weight)
    for i in (1, 3):
        assert torch.equal(got[i], want[i]), f"gradient {i}"

    x = _subnormal((2, 6, 3), seed=3, device=device)
    scores = _subnormal((6,), seed=4, device=device)
    scores[0] = tiny
    assert bool((x[:, 0] != 0).any())
    y = kernels.channel_gate_forward(x, scores, thr, cut, 1)
    assert torch.equal(y, R.channel_gate_forward(x, scores, thr, cut, 1)) and torch.equal(y[:, 0], x[:, 0])
    args = (torch.ones_like(x), x, scores, thr, cut, 1, "ste", 1.0, [True, True])
    for got_g, want_g in zip(kernels.channel_gate_backward(*args), R.channel_gate_backward(*args)):
        assert torch.equal(got_g, want_g)


# ----------------------------------------------------------------------------- channel gate


@pytest.mark.parametrize("layout", list(GATE_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator,temperature", ESTIMATORS)
def test_channel_gate_matches_reference(kernels, layout, dtype, estimator, temperature):
    check_gate(kernels, kernels.device, layout, dtype, estimator, temperature)


def test_channel_gate_grad_y_in_another_layout_than_x(kernels):
    device = kernels.device
    x = randn(3, 7, 5, 6, seed=1, device=device).to(memory_format=torch.channels_last)
    scores, thr, cut = tied_scores((7,), seed=2, device=device)
    args = (randn(3, 7, 5, 6, seed=3, device=device), x, scores, thr, cut, 1, "sigmoid", 0.3, [True, True])
    assert_grads(kernels.channel_gate_backward(*args), R.channel_gate_backward(*args), torch.float32)


def test_channel_gate_long_reduction_axis(kernels):
    """Many entries per channel (split over programs / threads where a backend does so)."""
    device = kernels.device
    x = randn(600, 5, seed=1, device=device)
    scores = torch.tensor([0.3, -1.0, 0.3, 2.0, 0.3], device=device)
    thr, cut = (t.to(device) for t in R.topk_select([scores.cpu()], 2))
    args = (randn(600, 5, seed=2, device=device), x, scores, thr, cut, 1, "sigmoid", 1.0, [True, True])
    assert_grads(kernels.channel_gate_backward(*args), R.channel_gate_backward(*args), torch.float32)


def test_channel_gate_negative_dim_equals_positive_dim(kernels):
    device = kernels.device
    x, gy = randn(4, 3, 13, seed=1, device=device), randn(4, 3, 13, seed=2, device=device)
    scores, thr, cut = tied_scores((13,), seed=3, device=device)
    assert torch.equal(kernels.channel_gate_forward(x, scores, thr, cut, -1),
                       kernels.channel_gate_forward(x, scores, thr, cut, 2))
    for got, want in zip(kernels.channel_gate_backward(gy, x, scores, thr, cut, -1, "ste", 1.0, [True, True]),
                         kernels.channel_gate_backward(gy, x, scores, thr, cut, 2, "ste", 1.0, [True, True])):
        assert torch.equal(got, want)



@pytest.mark.parametrize("score_dtype", DTYPES)
@pytest.mark.parametrize("op", ["linear", "linear_per_unit", "conv2d", "gate"])
def test_negative_threshold_with_scores_of_every_dtype(kernels, op, score_dtype):
    """Scores and threshold below zero: a compare of bf16 (or fp16) bit patterns as integers orders
    negative values backwards (Triton's interpreter does so for bf16), which a threshold at 0 hides."""
    device = kernels.device
    shape = {"linear": (6, 8), "linear_per_unit": (6,), "conv2d": (6, 3, 2, 2), "gate": (6,)}[op]
    scores, thr, cut = tied_scores(shape, score_dtype, seed=1, device=device)
    scores, thr = scores - 0.5, thr - 0.5  # exact in every dtype: the order and the cut are unchanged
    if op == "gate":
        x = randn(3, 6, 5, seed=2, device=device)
        assert torch.equal(kernels.channel_gate_forward(x, scores, thr, cut, 1),
                           R.channel_gate_forward(x, scores, thr, cut, 1))
    elif op == "conv2d":
        x, w = randn(2, 3, 5, 5, seed=2, device=device), randn(*shape, seed=3, device=device)
        conv = ([1, 1], [0, 0], [1, 1], 1)
        torch.testing.assert_close(kernels.masked_conv2d_forward(x, w, None, scores, thr, cut, *conv),
                                   R.masked_conv2d_forward(x, w, None, scores, thr, cut, *conv), **tol(torch.float32))
    else:
        x, w = randn(4, 8, seed=2, device=device), randn(6, 8, seed=3, device=device)
        torch.testing.assert_close(kernels.masked_linear_forward(x, w, None, scores, thr, cut),
                                   R.masked_linear_forward(x, w, None, scores, thr, cut), **tol(torch.float32))

# ----------------------------------------------------------------------------- through the public API


@pytest.mark.parametrize("structured", [False, True])
def test_public_api_with_this_backend_equals_the_torch_backend(kernels, structured):
    """Forward and every gradient of the three masked ops, selected by this backend's name."""
    device = kernels.device
    x, w, b = randn(5, 12, seed=1, device=device), randn(7, 12, seed=2, device=device), randn(7, seed=3, device=device)
    s = randn(*((7,) if structured else (7, 12)), seed=4, device=device)
    xc = randn(2, 4, 8, 9, seed=5, device=device).to(memory_format=torch.channels_last)
    wc, sc = randn(6, 2, 3, 3, seed=6, device=device), randn(*((6,) if structured else (6, 2, 3, 3)), seed=7,
                                                             device=device)
    cases = [
        (lambda x, w, b, s: bk.masked_linear(x, w, b, s, density=0.4, estimator="sigmoid"), (x, w, b, s)),
        (lambda x, w, s: bk.masked_conv2d(x, w, None, s, density=0.6, stride=2, padding=1, groups=2), (xc, wc, sc)),
        (lambda x, s: bk.channel_gate(x, s, threshold=0.1), (xc, randn(4, seed=8, device=device))),
    ]
    for fn, tensors in cases:
        results = []
        for name in (kernels.name, "torch"):
            leaves = [t.detach().requires_grad_() for t in tensors]
            with bk.use_backend(name):
                y = fn(*leaves)
                y.backward(randn(*y.shape, seed=9, device=device))
            results.append((y.detach(), [t.grad for t in leaves]))
        torch.testing.assert_close(results[0][0], results[1][0], **tol(torch.float32))
        assert_grads(results[0][1], results[1][1], torch.float32)


# ----------------------------------------------------------------------------- fp16 / bf16 conv on the CPU

_HALF_CONV_ON_CPU = r"""
import json, sys
import torch
import bise_kernels as bk
from bise_kernels.backends import reference as R

geometry = dict(stride=(2, 3), padding=1, dilation=2, groups=2)
results = {}
for backend in bk.available_backends("cpu"):
    for dtype in (torch.float16, torch.bfloat16):
        gen = torch.Generator().manual_seed(7)
        x, w, b = (torch.randn(*s, generator=gen).to(dtype) for s in ((2, 16, 23, 29), (16, 8, 3, 3), (16,)))
        scores = torch.randn(16, 8, 3, 3, generator=gen)
        gy = torch.randn(2, 16, 11, 9, generator=gen).to(dtype)
        leaves = [t.clone().requires_grad_() for t in (x, w, b, scores)]
        with bk.use_backend(backend):
            y = bk.masked_conv2d(*leaves, density=0.5, **geometry)
            grads = torch.autograd.grad(y, leaves, gy)
        # the rule: torch's own convolution of W * keep in the dtype, as nn.Conv2d computes it
        keep = bk.topk_mask(scores, 0.5)
        w_eff, s, p, d, g = w * keep, *geometry.values()
        want = [torch.nn.functional.conv2d(x, w_eff, b, s, p, d, g),
                torch.nn.grad.conv2d_input(x.shape, w_eff, gy, s, p, d, g),
                torch.nn.grad.conv2d_weight(x, w.shape, gy, s, p, d, g) * keep]
        got = [y, *grads[:2]]
        reference = R.masked_conv2d_keep_backward(gy, x, w, scores, keep, list(s), [p, p], [d, d], g, "ste", 1.0,
                                                  [False, False, True, True])
        results[f"{backend}/{str(dtype)[6:]}"] = {
            "bits": [torch.equal(a, e) for a, e in zip(got, want)],
            "close": [torch.allclose(a.float(), e.float(), rtol=2e-2, atol=2e-2)
                      for a, e in zip(grads[2:], reference[2:])]}
print(json.dumps(results))
"""


def test_half_conv_on_the_cpu_is_torchs_own():
    """fp16 / bf16 masked conv2d on the CPU, every backend, at the shape once seen to crash torch 2.13's own fp16 CPU
    convolution (stride (2, 3), dilation 2; docs/masked.md): in a child process, so a crash is a failure and not the
    end of the run; the output, grad_x and grad_W have the bits of torch's convolution of W * keep (nn.Conv2d's)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _HALF_CONV_ON_CPU], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"torch/float16", "torch/bfloat16"} <= set(results), results
    wrong = {case: r for case, r in results.items() if not all(r["bits"]) or not all(r["close"])}
    assert not wrong, wrong


def test_reference_channel_gate_backward_takes_a_negative_dim():
    """The reference (excluded from the ``kernels`` fixture) with dim=-1 as with dim=2: its score gradient
    reduces over every dim but the gated one (a raw op call passes dim unnormalised)."""
    x, gy = randn(4, 3, 13, seed=1), randn(4, 3, 13, seed=2)
    scores, thr, cut = tied_scores((13,), seed=3)
    for got, want in zip(R.channel_gate_backward(gy, x, scores, thr, cut, -1, "sigmoid", 0.5, [True, True]),
                         R.channel_gate_backward(gy, x, scores, thr, cut, 2, "sigmoid", 0.5, [True, True])):
        assert torch.equal(got, want)


@pytest.mark.parametrize("op", ["linear", "conv2d", "gate"])
def test_float64_per_unit_score_gradients_keep_float64_precision(kernels, op):
    """Per-unit score gradients of float64 data and scores are summed in float64 as the reference does
    (a backend's partial sums per tile included): the tight float64 tolerance, not the fp32 one."""
    device, f64 = kernels.device, torch.float64
    scores, thr, cut = tied_scores((29,), f64, seed=4, device=device)
    if op == "linear":
        x, w = randn(2, 3, 70, dtype=f64, seed=1, device=device), randn(29, 70, dtype=f64, seed=2, device=device)
        args = (randn(2, 3, 29, dtype=f64, seed=5, device=device), x, w, scores, thr, cut, "sigmoid", 0.5,
                [False, False, False, True])
        got, want = kernels.masked_linear_backward(*args)[3], R.masked_linear_backward(*args)[3]
    elif op == "conv2d":
        x, w = randn(2, 6, 9, 11, dtype=f64, seed=1, device=device), randn(29, 6, 3, 2, dtype=f64, seed=2, device=device)
        gy = randn(2, 29, 7, 10, dtype=f64, seed=5, device=device)
        args = (gy, x, w, scores, thr, cut, [1, 1], [0, 0], [1, 1], 1, "sigmoid", 0.5, [False, False, False, True])
        got, want = kernels.masked_conv2d_backward(*args)[3], R.masked_conv2d_backward(*args)[3]
    else:
        x, gy = randn(40, 29, 50, dtype=f64, seed=1, device=device), randn(40, 29, 50, dtype=f64, seed=2, device=device)
        args = (gy, x, scores, thr, cut, 1, "sigmoid", 0.5, [False, True])
        got, want = kernels.channel_gate_backward(*args)[1], R.channel_gate_backward(*args)[1]
    assert got.dtype == f64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("structured", [False, True])
def test_masked_conv2d_with_a_weight_strided_in_its_kernel_dims(kernels, structured):
    """A weight view whose kernel dims are not nested as in a contiguous (or channels_last) one (a transpose
    of kH and kW: stride_h != kW * stride_w), scores likewise: every element read where it lies."""
    device = kernels.device
    x = randn(2, 6, 9, 11, seed=1, device=device)
    w = randn(9, 6, 2, 3, seed=2, device=device).transpose(2, 3)  # (9, 6, 3, 2), strides (36, 6, 1, 3)
    b = randn(9, seed=3, device=device)
    scores, thr, cut = tied_scores((9,) if structured else (9, 6, 2, 3), seed=4, device=device)
    if not structured:
        scores = scores.transpose(2, 3)
    conv = ([1, 1], [1, 0], [1, 1], 1)
    want = R.masked_conv2d_forward(x, w, b, scores, thr, cut, *conv)
    torch.testing.assert_close(kernels.masked_conv2d_forward(x, w, b, scores, thr, cut, *conv), want, **tol(torch.float32))
    args = (randn(*want.shape, seed=5, device=device), x, w, scores, thr, cut, *conv, "sigmoid", 0.5, list(ALL_NEEDS))
    assert_grads(kernels.masked_conv2d_backward(*args), R.masked_conv2d_backward(*args), torch.float32)


def test_channel_gate_backward_of_an_empty_batch_has_zero_score_gradient(kernels):
    """No activations (a batch of 0): the score gradient is a sum over nothing, zeros, as the reference's."""
    device = kernels.device
    x = gy = randn(0, 5, 3, device=device)
    scores, thr, cut = tied_scores((5,), seed=3, device=device)
    for estimator in ("ste", "sigmoid"):
        got = kernels.channel_gate_backward(gy, x, scores, thr, cut, 1, estimator, 0.5, [True, True])
        want = R.channel_gate_backward(gy, x, scores, thr, cut, 1, estimator, 0.5, [True, True])
        assert got[0].shape == x.shape and torch.equal(got[1], want[1]) and torch.equal(want[1], torch.zeros(5))
