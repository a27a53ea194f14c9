"""The "cpp" backend's fused masked-layer and channel-gate kernels against the reference backend."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import bise_kernels
from bise_kernels.backends import reference as R

try:
    from bise_kernels.backends.cpp import masked as cpp
except (ImportError, AttributeError) as exc:  # no extension, or one built before these kernels existed
    pytest.skip(f"cpp masked kernels unavailable: {exc}", allow_module_level=True)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ESTIMATORS = [("ste", 1.0), ("sigmoid", 0.7)]
ALL_NEEDS = [True, True, True, True]


def _tol(dtype, score_grad=False):
    if dtype == torch.float64:  # the reference forms score gradients in fp32 math
        return dict(rtol=2e-6, atol=1e-7) if score_grad else dict(rtol=1e-12, atol=1e-12)
    return {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-2, atol=1e-2),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]


def _assert_grads(got, want, dtype):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"gradient {i} should not be computed"
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, f"gradient {i}: {g.dtype}{tuple(g.shape)}"
        torch.testing.assert_close(g, w, **_tol(dtype, score_grad=i == len(want) - 1), msg=f"gradient {i}")


def _tied_scores(shape, dtype, seed):
    """Scores on a coarse grid (many exact ties) and a top-k whose threshold cuts through a tie group."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randint(-4, 5, shape, generator=g) / 4).to(dtype)
    flat = scores.view(-1)
    flat[1] = flat[-1] = 0  # at least two ties at zero
    k = int((flat > 0).sum()) + int((flat == 0).sum()) // 2  # half of the zeros are kept
    thr, cut = R.topk_select([scores], k)
    assert float(thr) == 0.0 and int(cut) < scores.numel()
    return scores, thr, cut


def _randn(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------- masked linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("estimator,temperature", ESTIMATORS)
def test_masked_linear_matches_reference(dtype, structured, estimator, temperature):
    x, w, b = _randn(2, 3, 37, dtype=dtype, seed=1), _randn(29, 37, dtype=dtype, seed=2), _randn(29, dtype=dtype, seed=3)
    scores, thr, cut = _tied_scores((29,) if structured else (29, 37), torch.float32, seed=4)
    gy = _randn(2, 3, 29, dtype=dtype, seed=5)
    y = cpp.masked_linear_forward(x, w, b, scores, thr, cut)
    torch.testing.assert_close(y, R.masked_linear_forward(x, w, b, scores, thr, cut), **_tol(dtype))
    args = (gy, x, w, scores, thr, cut, estimator, temperature, ALL_NEEDS)
    _assert_grads(cpp.masked_linear_backward(*args), R.masked_linear_backward(*args), dtype)


@pytest.mark.parametrize("needs", [n for n in itertools.product([False, True], repeat=4) if any(n)])
def test_masked_linear_computes_only_needed_gradients(needs):
    x, w = _randn(7, 13, dtype=torch.float32, seed=1), _randn(5, 13, dtype=torch.float32, seed=2)
    scores, thr, cut = _tied_scores((5, 13), torch.float32, seed=3)
    args = (_randn(7, 5, dtype=torch.float32, seed=4), x, w, scores, thr, cut, "sigmoid", 2.0, list(needs))
    _assert_grads(cpp.masked_linear_backward(*args), R.masked_linear_backward(*args), torch.float32)


@pytest.mark.parametrize("score_dtype", [torch.float64, torch.float16])
def test_masked_linear_scores_in_another_dtype(score_dtype):
    x, w = _randn(6, 11, dtype=torch.bfloat16, seed=1), _randn(9, 11, dtype=torch.bfloat16, seed=2)
    scores, thr, cut = _tied_scores((9, 11), score_dtype, seed=3)
    torch.testing.assert_close(cpp.masked_linear_forward(x, w, None, scores, thr, cut),
                               R.masked_linear_forward(x, w, None, scores, thr, cut), **_tol(torch.bfloat16))
    args = (_randn(6, 9, dtype=torch.bfloat16, seed=4), x, w, scores, thr, cut, "sigmoid", 1.0, ALL_NEEDS)
    got, want = cpp.masked_linear_backward(*args), R.masked_linear_backward(*args)
    _assert_grads(got[:3], want[:3], torch.bfloat16)
    torch.testing.assert_close(got[3], want[3], rtol=2e-2, atol=2e-2)


def test_threshold_mode_keeps_all_ties():
    x, w = _randn(4, 10, dtype=torch.float32, seed=1), _randn(6, 10, dtype=torch.float32, seed=2)
    scores, _, _ = _tied_scores((6, 10), torch.float32, seed=3)
    thr, cut = torch.tensor(0.0), torch.tensor(R.KEEP_ALL_TIES)
    want = F.linear(x, w * (scores >= 0))
    torch.testing.assert_close(cpp.masked_linear_forward(x, w, None, scores, thr, cut), want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- masked conv2d

CONV_CASES = [  # stride, padding, dilation, groups
    ((1, 1), (0, 0), (1, 1), 1),
    ((2, 2), (1, 1), (1, 1), 1),
    ((2, 1), (1, 2), (2, 1), 1),
    ((1, 1), (1, 1), (1, 1), 3),
]


@pytest.mark.parametrize("stride,padding,dilation,groups", CONV_CASES)
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_conv2d_matches_reference(stride, padding, dilation, groups, structured, channels_last):
    x = _randn(2, 6, 9, 11, dtype=torch.float32, seed=1)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = _randn(9, 6 // groups, 3, 2, dtype=torch.float32, seed=2), _randn(9, dtype=torch.float32, seed=3)
    scores, thr, cut = _tied_scores((9,) if structured else w.shape, torch.float32, seed=4)
    conv = (list(stride), list(padding), list(dilation), groups)
    y = cpp.masked_conv2d_forward(x, w, b, scores, thr, cut, *conv)
    want = R.masked_conv2d_forward(x, w, b, scores, thr, cut, *conv)
    torch.testing.assert_close(y, want, **_tol(torch.float32))
    args = (torch.randn_like(want), x, w, scores, thr, cut, *conv, "sigmoid", 0.5, ALL_NEEDS)
    _assert_grads(cpp.masked_conv2d_backward(*args), R.masked_conv2d_backward(*args), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("needs", [[True, False, False, True], [False, True, True, False], ALL_NEEDS])
def test_masked_conv2d_dtypes_and_needs(dtype, needs):
    x, w = _randn(2, 4, 7, 5, dtype=dtype, seed=1), _randn(5, 4, 3, 3, dtype=dtype, seed=2)
    scores, thr, cut = _tied_scores(w.shape, torch.float32, seed=3)
    conv = ([1, 2], [1, 0], [1, 1], 1)
    want = R.masked_conv2d_forward(x, w, None, scores, thr, cut, *conv)
    torch.testing.assert_close(cpp.masked_conv2d_forward(x, w, None, scores, thr, cut, *conv), want, **_tol(dtype))
    args = (_randn(*want.shape, dtype=dtype, seed=4), x, w, scores, thr, cut, *conv, "ste", 1.0, needs)
    _assert_grads(cpp.masked_conv2d_backward(*args), R.masked_conv2d_backward(*args), dtype)


# ----------------------------------------------------------------------------- channel gate

GATE_LAYOUTS = {  # name -> (x factory, dim); inner >= 16 and inner < 16 take different reduction paths
    "nchw": (lambda d: _randn(3, 5, 6, 7, dtype=d, seed=1), 1),
    "channels_last": (lambda d: _randn(3, 5, 6, 7, dtype=d, seed=1).to(memory_format=torch.channels_last), 1),
    "last_dim": (lambda d: _randn(4, 3, 13, dtype=d, seed=1), 2),
    "first_dim": (lambda d: _randn(13, 2, 3, dtype=d, seed=1), 0),
    "small_inner": (lambda d: _randn(17, 13, 3, dtype=d, seed=1), 1),
    "strided": (lambda d: _randn(7, 5, 6, dtype=d, seed=1).transpose(0, 2), 1),
}


@pytest.mark.parametrize("layout", list(GATE_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator,temperature", ESTIMATORS)
def test_channel_gate_matches_reference(layout, dtype, estimator, temperature):
    make, dim = GATE_LAYOUTS[layout]
    x = make(dtype)
    scores, thr, cut = _tied_scores((x.shape[dim],), torch.float32, seed=2)
    y = cpp.channel_gate_forward(x, scores, thr, cut, dim)
    want = R.channel_gate_forward(x, scores, thr, cut, dim)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    gy = torch.randn(x.shape).to(dtype)  # contiguous even where x is channels_last
    for needs in ([True, True], [True, False], [False, True]):
        args = (gy, x, scores, thr, cut, dim, estimator, temperature, needs)
        _assert_grads(cpp.channel_gate_backward(*args), R.channel_gate_backward(*args), dtype)


def test_channel_gate_negative_dim_is_wrapped():
    x, gy = _randn(4, 3, 13, dtype=torch.float32, seed=1), _randn(4, 3, 13, dtype=torch.float32, seed=2)
    scores, thr, cut = _tied_scores((13,), torch.float32, seed=3)
    assert torch.equal(cpp.channel_gate_forward(x, scores, thr, cut, -1), cpp.channel_gate_forward(x, scores, thr, cut, 2))
    for got, want in zip(cpp.channel_gate_backward(gy, x, scores, thr, cut, -1, "ste", 1.0, [True, True]),
                         cpp.channel_gate_backward(gy, x, scores, thr, cut, 2, "ste", 1.0, [True, True])):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- public API


@pytest.fixture
def cpp_backend():
    with bise_kernels.use_backend("cpp"):
        yield


def _api_grads(fn, tensors):
    leaves = [t.detach().requires_grad_() for t in tensors]
    y = fn(*leaves)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype))
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("structured", [False, True])
def test_public_api_matches_torch_backend(structured):
    x, w, b = _randn(5, 12, dtype=torch.float32, seed=1), _randn(7, 12, dtype=torch.float32, seed=2), \
        _randn(7, dtype=torch.float32, seed=3)
    s = _randn(*((7,) if structured else (7, 12)), dtype=torch.float32, seed=4)
    xc, wc, sc = _randn(2, 4, 8, 9, dtype=torch.float32, seed=5), _randn(6, 2, 3, 3, dtype=torch.float32, seed=6), \
        _randn(*((6,) if structured else (6, 2, 3, 3)), dtype=torch.float32, seed=7)
    gs = _randn(4, dtype=torch.float32, seed=8)
    cases = [
        (lambda x, w, b, s: bise_kernels.masked_linear(x, w, b, s, density=0.4, estimator="sigmoid"), (x, w, b, s)),
        (lambda x, w, s: bise_kernels.masked_conv2d(x, w, None, s, density=0.6, stride=2, padding=1, groups=2),
         (xc, wc, sc)),
        (lambda x, s: bise_kernels.channel_gate(x, s, threshold=0.1), (xc, gs)),
    ]
    for fn, tensors in cases:
        with bise_kernels.use_backend("cpp"):
            got = _api_grads(fn, tensors)
        with bise_kernels.use_backend("torch"):
            want = _api_grads(fn, tensors)
        torch.testing.assert_close(got[0], want[0], **_tol(torch.float32))
        _assert_grads(got[1], want[1], torch.float32)


def test_gradcheck_float64(cpp_backend):
    x, w, b = (_randn(*shape, dtype=torch.float64, seed=i).requires_grad_() for i, shape in
               enumerate([(4, 6), (5, 6), (5,)]))
    s = _randn(5, 6, dtype=torch.float64, seed=3)
    assert torch.autograd.gradcheck(lambda x, w, b: bise_kernels.masked_linear(x, w, b, s, density=0.5), (x, w, b))
    xc, wc = _randn(1, 4, 5, 6, dtype=torch.float64, seed=4).requires_grad_(), \
        _randn(4, 2, 2, 3, dtype=torch.float64, seed=5).requires_grad_()
    sc = _randn(4, dtype=torch.float64, seed=6)
    assert torch.autograd.gradcheck(
        lambda x, w: bise_kernels.masked_conv2d(x, w, None, sc, density=0.7, padding=1, dilation=(1, 2), groups=2),
        (xc, wc))
    sg = _randn(4, dtype=torch.float64, seed=7)
    assert torch.autograd.gradcheck(lambda x: bise_kernels.channel_gate(x, sg), (xc,))


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("estimator,temperature", ESTIMATORS)
def test_score_gradient_is_numerical_dloss_dweff_times_weight_times_slope(cpp_backend, structured, estimator,
                                                                          temperature):
    x, w, r = _randn(3, 5, dtype=torch.float64, seed=1), _randn(4, 5, dtype=torch.float64, seed=2), \
        _randn(3, 4, dtype=torch.float64, seed=3)
    s = _randn(*((4,) if structured else (4, 5)), dtype=torch.float64, seed=4).requires_grad_()
    (bise_kernels.masked_linear(x, w, None, s, density=0.5, estimator=estimator, temperature=temperature) * r) \
        .sum().backward()
    w_eff = w * R._broadcast_unit(R.keep_mask(s.detach(), *R.topk_select([s.detach()], 2 if structured else 10)), w)
    loss = lambda w_eff: (F.linear(x, w_eff) * r).sum()  # noqa: E731
    numerical, h = torch.zeros_like(w), 1e-6
    for i in range(w.numel()):
        e = torch.zeros(w.numel(), dtype=torch.float64)
        e[i] = h
        numerical.view(-1)[i] = (loss(w_eff + e.view_as(w)) - loss(w_eff - e.view_as(w))) / (2 * h)
    per_weight = numerical * w
    if structured:
        per_weight = per_weight.sum(1)
    sd = s.detach()
    slope = 1.0 if estimator == "ste" else torch.sigmoid(sd / temperature) * (1 - torch.sigmoid(sd / temperature)) \
        / temperature
    torch.testing.assert_close(s.grad, per_weight * slope, rtol=1e-7, atol=1e-8)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_named_before_any_work():
    ops = cpp.FusedMaskedKernels()
    w, s = torch.randn(3, 4), torch.randn(3, 4)
    thr, cut = R.topk_select([s], 5)
    with pytest.raises(RuntimeError, match=r"scores must have weight's shape"):
        ops.masked_weight(w, torch.randn(4, 3), thr, cut)
    with pytest.raises(RuntimeError, match=r"thr must have the scores' dtype"):
        ops.masked_weight(w, s, thr.double(), cut)
    with pytest.raises(RuntimeError, match=r"estimator must be 'ste' or 'sigmoid', got 'straight'"):
        ops.score_grad(torch.randn(3, 4), w, s, thr, cut, "straight", 1.0, True, False)
    with pytest.raises(RuntimeError, match=r"grad_w_eff must be contiguous"):
        ops.score_grad(torch.randn(4, 3).t(), w, s, thr, cut, "ste", 1.0, True, False)
    with pytest.raises(RuntimeError, match=r"scores must have shape \(5,\)"):
        ops.gate_forward(torch.randn(2, 5, 3), torch.randn(4), thr, cut, 1)
    with pytest.raises(RuntimeError, match=r"x must be float32/float64/float16/bfloat16"):
        ops.gate_forward(torch.ones(2, 3, dtype=torch.int32), torch.randn(3), thr, cut, 1)
