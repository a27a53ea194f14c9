"""The "cpp" backend's fused masked-layer and channel-gate kernels against the reference backend."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import bise_kernels
from _masked_cases import (ALL_NEEDS, CONV_CASES, DTYPES, ESTIMATORS, GATE_LAYOUTS, assert_grads, check_conv,
                           check_gate, check_linear, randn, tied_scores, tol)
from bise_kernels.backends import reference as R

try:
    from bise_kernels.backends.cpp import masked as cpp
except (ImportError, AttributeError) as exc:  # no extension, or one built before these kernels existed
    pytest.skip(f"cpp masked kernels unavailable: {exc}", allow_module_level=True)


# ----------------------------------------------------------------------------- masked linear


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("estimator,temperature", ESTIMATORS)
def test_masked_linear_matches_reference(dtype, structured, estimator, temperature):
    check_linear(cpp, "cpu", dtype, structured, estimator, temperature)


@pytest.mark.parametrize("needs", [n for n in itertools.product([False, True], repeat=4) if any(n)])
def test_masked_linear_computes_only_needed_gradients(needs):
    check_linear(cpp, "cpu", torch.float32, False, "sigmoid", 2.0, needs)


@pytest.mark.parametrize("score_dtype", [torch.float64, torch.float16])
def test_masked_linear_scores_in_another_dtype(score_dtype):
    x, w = randn(6, 11, dtype=torch.bfloat16, seed=1), randn(9, 11, dtype=torch.bfloat16, seed=2)
    scores, thr, cut = tied_scores((9, 11), score_dtype, seed=3)
    torch.testing.assert_close(cpp.masked_linear_forward(x, w, None, scores, thr, cut),
                               R.masked_linear_forward(x, w, None, scores, thr, cut), **tol(torch.bfloat16))
    args = (randn(6, 9, dtype=torch.bfloat16, seed=4), x, w, scores, thr, cut, "sigmoid", 1.0, ALL_NEEDS)
    got, want = cpp.masked_linear_backward(*args), R.masked_linear_backward(*args)
    assert_grads(got[:3], want[:3], torch.bfloat16)
    torch.testing.assert_close(got[3], want[3], rtol=2e-2, atol=2e-2)


def test_threshold_mode_keeps_all_ties():
    x, w = randn(4, 10, dtype=torch.float32, seed=1), randn(6, 10, dtype=torch.float32, seed=2)
    scores, _, _ = tied_scores((6, 10), torch.float32, seed=3)
    thr, cut = torch.tensor(0.0), torch.tensor(R.KEEP_ALL_TIES)
    want = F.linear(x, w * (scores >= 0))
    torch.testing.assert_close(cpp.masked_linear_forward(x, w, None, scores, thr, cut), want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- masked conv2d


@pytest.mark.parametrize("conv_case", CONV_CASES)
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_conv2d_matches_reference(conv_case, structured, channels_last):
    check_conv(cpp, "cpu", torch.float32, conv_case, structured, channels_last)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("needs", [[True, False, False, True], [False, True, True, False], ALL_NEEDS])
def test_masked_conv2d_dtypes_and_needs(dtype, needs):
    check_conv(cpp, "cpu", dtype, CONV_CASES[2], False, False, needs)


# ----------------------------------------------------------------------------- channel gate


@pytest.mark.parametrize("layout", list(GATE_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("estimator,temperature", ESTIMATORS)
def test_channel_gate_matches_reference(layout, dtype, estimator, temperature):
    check_gate(cpp, "cpu", layout, dtype, estimator, temperature)


def test_channel_gate_negative_dim_is_wrapped():
    x, gy = randn(4, 3, 13, dtype=torch.float32, seed=1), randn(4, 3, 13, dtype=torch.float32, seed=2)
    scores, thr, cut = tied_scores((13,), torch.float32, seed=3)
    y = cpp.channel_gate_forward(x, scores, thr, cut, -1)
    assert torch.equal(y, cpp.channel_gate_forward(x, scores, thr, cut, 2))
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
    x, w, b = randn(5, 12, dtype=torch.float32, seed=1), randn(7, 12, dtype=torch.float32, seed=2), \
        randn(7, dtype=torch.float32, seed=3)
    s = randn(*((7,) if structured else (7, 12)), dtype=torch.float32, seed=4)
    xc, wc, sc = randn(2, 4, 8, 9, dtype=torch.float32, seed=5), randn(6, 2, 3, 3, dtype=torch.float32, seed=6), \
        randn(*((6,) if structured else (6, 2, 3, 3)), dtype=torch.float32, seed=7)
    gs = randn(4, dtype=torch.float32, seed=8)
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
        torch.testing.assert_close(got[0], want[0], **tol(torch.float32))
        assert_grads(got[1], want[1], torch.float32)


def test_gradcheck_float64(cpp_backend):
    x, w, b = (randn(*shape, dtype=torch.float64, seed=i).requires_grad_() for i, shape in
               enumerate([(4, 6), (5, 6), (5,)]))
    s = randn(5, 6, dtype=torch.float64, seed=3)
    assert torch.autograd.gradcheck(lambda x, w, b: bise_kernels.masked_linear(x, w, b, s, density=0.5), (x, w, b))
    xc, wc = randn(1, 4, 5, 6, dtype=torch.float64, seed=4).requires_grad_(), \
        randn(4, 2, 2, 3, dtype=torch.float64, seed=5).requires_grad_()
    sc = randn(4, dtype=torch.float64, seed=6)
    assert torch.autograd.gradcheck(
        lambda x, w: bise_kernels.masked_conv2d(x, w, None, sc, density=0.7, padding=1, dilation=(1, 2), groups=2),
        (xc, wc))
    sg = randn(4, dtype=torch.float64, seed=7)
    assert torch.autograd.gradcheck(lambda x: bise_kernels.channel_gate(x, sg), (xc,))


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("estimator,temperature", ESTIMATORS)
def test_score_gradient_is_numerical_dloss_dweff_times_weight_times_slope(cpp_backend, structured, estimator,
                                                                          temperature):
    x, w, r = randn(3, 5, dtype=torch.float64, seed=1), randn(4, 5, dtype=torch.float64, seed=2), \
        randn(3, 4, dtype=torch.float64, seed=3)
    s = randn(*((4,) if structured else (4, 5)), dtype=torch.float64, seed=4).requires_grad_()
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
    ops = torch.ops.bise_kernels_ext
    w, s = torch.randn(3, 4), torch.randn(3, 4)
    thr, cut = R.topk_select([s], 5)
    with pytest.raises(RuntimeError, match=r"scores must have weight's shape"):
        ops.masked_weight(w, torch.randn(4, 3), thr, cut)
    with pytest.raises(RuntimeError, match=r"thr must have the scores' dtype"):
        ops.masked_weight(w, s, thr.double(), cut)
    with pytest.raises(RuntimeError, match=r"estimator must be 'ste' or 'sigmoid', got 'straight'"):
        ops.masked_score_grad(torch.randn(3, 4), w, s, thr, cut, "straight", 1.0, True, False)
    with pytest.raises(RuntimeError, match=r"grad_w_eff must be contiguous"):
        ops.masked_score_grad(torch.randn(4, 3).t(), w, s, thr, cut, "ste", 1.0, True, False)
    with pytest.raises(RuntimeError, match=r"scores must have shape \(5,\)"):
        ops.channel_gate_forward(torch.randn(2, 5, 3), torch.randn(4), thr, cut, 1)
    with pytest.raises(RuntimeError, match=r"x must be float32/float64/float16/bfloat16"):
        ops.channel_gate_forward(torch.ones(2, 3, dtype=torch.int32), torch.randn(3), thr, cut, 1)
