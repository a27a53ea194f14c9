"""The packed-mask masked linear (``masked_linear_keep``: the selection packed once into a bool keep
mask that forward and backward read) against the reference backend on every backend, the same
results as the selection path, and MaskedLinear's mask modes and keep-mask cache. Op schemas:
test_opcheck.py; the extension's argument errors: test_native_checks.py."""

import itertools

import pytest
import torch

import bise_kernels as bk
from _masked_cases import (ALL_NEEDS, DTYPES, ESTIMATORS, assert_compiles_and_exports, assert_grads,
                           assert_keep_trains_like_selection, randn, tied_scores, tol)
from bise_kernels import _checks, _ops
from bise_kernels.backends import reference as R


def _keep_kernels(kernels, backward=True):
    names = ("masked_linear_keep_forward",) + (("masked_linear_keep_backward",) if backward else ())
    if not all(hasattr(kernels, n) for n in names):
        pytest.skip(f"backend {kernels.name!r} has no {' / '.join(names)}")


def _layer(dtype, structured, device, rows=(2, 3)):
    x, w, b = (randn(*s, dtype=dtype, seed=i, device=device) for i, s in enumerate([(*rows, 37), (29, 37), (29,)]))
    scores, thr, cut = tied_scores((29,) if structured else (29, 37), seed=4, device=device)
    return x, w, b, scores, R.keep_mask(scores, thr, cut)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("structured", [False, True])
def test_keep_forward_matches_reference(kernels, dtype, structured):
    _keep_kernels(kernels, backward=False)
    x, w, b, _, keep = _layer(dtype, structured, kernels.device)
    torch.testing.assert_close(kernels.masked_linear_keep_forward(x, w, b, keep),
                               R.masked_linear_keep_forward(x, w, b, keep), **tol(dtype))


@pytest.mark.parametrize("rows", [16, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_keep_forward_small_m(kernels, rows, dtype):
    """The memory-bound regime the packed mask is for (M <= 256), ragged sizes so tiles are partial."""
    _keep_kernels(kernels, backward=False)
    device = kernels.device
    x, w = randn(rows, 80, dtype=dtype, seed=1, device=device), randn(96, 80, dtype=dtype, seed=2, device=device)
    keep = randn(96, 80, seed=3, device=device) > 0.3
    torch.testing.assert_close(kernels.masked_linear_keep_forward(x, w, None, keep),
                               R.masked_linear_keep_forward(x, w, None, keep), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("estimator,temperature", ESTIMATORS)
def test_keep_backward_matches_reference(kernels, dtype, structured, estimator, temperature):
    _keep_kernels(kernels)
    x, w, _, scores, keep = _layer(dtype, structured, kernels.device)
    args = (randn(2, 3, 29, dtype=dtype, seed=5, device=kernels.device), x, w, scores, keep, estimator, temperature,
            ALL_NEEDS)
    assert_grads(kernels.masked_linear_keep_backward(*args), R.masked_linear_keep_backward(*args), dtype)


@pytest.mark.parametrize("needs", [n for n in itertools.product([False, True], repeat=4) if any(n)])
@pytest.mark.parametrize("structured", [False, True])
def test_keep_backward_computes_only_needed_gradients(kernels, needs, structured):
    _keep_kernels(kernels)
    x, w, _, scores, keep = _layer(torch.float32, structured, kernels.device)
    args = (randn(2, 3, 29, seed=5, device=kernels.device), x, w, scores, keep, "sigmoid", 2.0, list(needs))
    assert_grads(kernels.masked_linear_keep_backward(*args), R.masked_linear_keep_backward(*args), torch.float32)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("estimator,temperature", ESTIMATORS)
def test_keep_backward_masks_by_keep_not_by_the_scores(kernels, structured, estimator, temperature):
    """A keep mask that is not the scores' (their mask's complement): keep masks, the scores give only the slope."""
    _keep_kernels(kernels)
    x, w, _, scores, keep = _layer(torch.float32, structured, kernels.device)
    args = (randn(2, 3, 29, seed=5, device=kernels.device), x, w, scores, ~keep, estimator, temperature, ALL_NEEDS)
    assert_grads(kernels.masked_linear_keep_backward(*args), R.masked_linear_keep_backward(*args), torch.float32)


@pytest.mark.parametrize("structured", [False, True])
def test_keep_op_equals_the_selection_op(backend, structured):
    """Same output and gradients as masked_linear with the selection the mask was packed from, to the bit
    on every backend ("triton", interpreted here: its keep kernels are its selection kernels reading the
    mask's bytes, on the same tiles)."""
    x, w, b, scores, _ = _layer(torch.float32, structured, "cpu")
    thr, cut = tied_scores(scores.shape, seed=4)[1:]
    leaves = [t.clone().requires_grad_() for t in (x, w, b, scores)]
    y = _ops.masked_linear(*leaves, thr, cut, "sigmoid", 0.7)
    want = (y, *torch.autograd.grad(y.sum(), leaves))
    y = _ops.masked_linear_keep(*leaves, _ops.keep_mask(scores, thr, cut, 0), "sigmoid", 0.7)
    got = (y, *torch.autograd.grad(y.sum(), leaves))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


# ----------------------------------------------------------------------------- MaskedLinear


def _pair(granularity="weight"):
    """The same layer twice: mask_mode "selection" and "keep"."""
    torch.manual_seed(0)
    a = bk.MaskedLinear(12, 7, density=0.4, granularity=granularity, estimator="sigmoid", mask_mode="selection")
    b = bk.MaskedLinear(12, 7, density=0.4, granularity=granularity, estimator="sigmoid", mask_mode="keep")
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_masked_linear_keep_mode_trains_like_the_selection_mode(backend, granularity):
    layers = _pair(granularity)
    x = torch.randn(5, 12)
    assert_keep_trains_like_selection(layers, x, backend)


def test_keep_mask_is_packed_once_per_selection():
    layer = bk.MaskedLinear(6, 4, density=0.5, mask_mode="keep")
    first = layer.keep()
    assert first.dtype == torch.bool and first.shape == layer.scores.shape
    assert layer.keep() is first  # reused while the scores are unchanged
    with torch.no_grad():
        layer.scores.neg_()
    assert layer.keep() is not first and torch.equal(layer.keep(), ~first)


def test_keep_mode_with_a_global_selection():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Linear(6, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    for net, mode in zip(nets, ("selection", "keep")):
        torch.manual_seed(1)
        bk.mask_model(net, density=0.3, scope="global")
        for layer in net:
            layer.mask_mode = mode
    x = torch.randn(4, 5)
    torch.testing.assert_close(nets[1](x), nets[0](x), rtol=0, atol=0)
    for a, b in zip(nets[0], nets[1]):
        assert torch.equal(b.keep(), a.mask())


def test_mask_mode_is_checked():
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        bk.MaskedLinear(3, 2, density=0.5, mask_mode="packed")
    layer = bk.MaskedLinear(3, 2, density=0.5)
    assert layer.mask_mode == "auto"
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        layer.mask_mode = None


def test_keep_arguments_are_checked():
    """The check the Triton kernel runs (the C++ ops': test_native_checks.py)."""
    x, w, b, scores, keep = _layer(torch.float32, False, "cpu")
    with pytest.raises(TypeError, match="keep must be a bool tensor"):
        _checks.check_masked_linear_keep(x, w, b, keep.float())
    with pytest.raises(ValueError, match="keep must have weight's shape"):
        _checks.check_masked_linear_keep(x, w, b, keep.t())
    with pytest.raises(ValueError, match="scores must have keep's shape"):
        _checks.check_masked_linear_keep(x, w, b, keep, scores[0])


@pytest.mark.parametrize("path", ["eager", "custom op"])
@pytest.mark.parametrize("structured", [False, True], ids=["weight scores, unit keep", "unit scores, weight keep"])
def test_keep_of_another_shape_than_the_scores_is_refused_in_forward(backend, path, structured):
    """Scores and a keep mask that each fit the weight but not each other: a ValueError naming them from
    the forward on every backend, eager and through the custom op (it passed the forward and failed in the
    backward on "cpp" / "triton", passed both on "torch"); conv2d_keep likewise."""
    x, w, b, scores, keep = _layer(torch.float32, structured, "cpu")
    other = R.keep_mask(*tied_scores(w.shape[:1] if not structured else w.shape, seed=6))
    leaves = [t.clone().requires_grad_() for t in (x, w, b, scores)]
    linear = _ops.masked_linear_keep if path == "eager" else _ops.masked_linear_keep.op
    with pytest.raises(ValueError, match="scores must have keep's shape"):
        linear(*leaves, other, "ste", 1.0)
    xc, wc = randn(1, 3, 6, 6, seed=7), randn(4, 3, 3, 3, seed=8)
    sc = randn(*((4, 3, 3, 3) if not structured else (4,)), seed=9)
    kc = randn(*((4,) if not structured else (4, 3, 3, 3)), seed=10) > 0
    conv = _ops.masked_conv2d_keep if path == "eager" else _ops.masked_conv2d_keep.op
    with pytest.raises(ValueError, match="scores must have keep's shape"):
        conv(xc, wc, None, sc.requires_grad_(), kc, [1, 1], [0, 0], [1, 1], 1, "ste", 1.0)


def test_keep_backward_kernels_refuse_a_keep_of_another_shape(kernels):
    """Each backend's keep backward kernels (the reference's too, which computed a gradient) refuse it."""
    x, w, _, scores, keep = _layer(torch.float32, True, kernels.device)
    other = R.keep_mask(*tied_scores(w.shape, seed=6, device=kernels.device))
    grad_y = randn(2, 3, 29, seed=5, device=kernels.device)
    for backward in {kernels.masked_linear_keep_backward, R.masked_linear_keep_backward}:
        with pytest.raises(ValueError, match="scores must have keep's shape"):
            backward(grad_y, x, w, scores, other, "ste", 1.0, ALL_NEEDS)


def test_keep_mode_compiles_and_exports(backend):
    """torch.compile (fullgraph) and torch.export see masked_linear_keep and give eager's results."""
    torch.manual_seed(0)
    layer = bk.MaskedLinear(12, 7, density=0.4, estimator="sigmoid", mask_mode="keep")
    x = torch.randn(5, 12)
    assert_compiles_and_exports(layer, x, "masked_linear_keep")


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("estimator,temperature", ESTIMATORS)
def test_keep_backward_reads_a_non_contiguous_keep_in_logical_order(kernels, structured, estimator, temperature):
    """A keep mask that is a strided view (a transpose, every other unit): the weight gradient is masked by
    its logical entries, as the reference (not by its storage order)."""
    _keep_kernels(kernels)
    x, w, _, scores, keep = _layer(torch.float32, structured, kernels.device)
    if structured:
        strided = torch.stack([keep, ~keep], 1)[:, 0]
    else:
        strided = keep.t().contiguous().t()
    assert not strided.is_contiguous() and torch.equal(strided, keep)
    for needs in (ALL_NEEDS, [False, True, False, False]):
        args = (randn(2, 3, 29, seed=5, device=kernels.device), x, w, scores, strided, estimator, temperature, needs)
        assert_grads(kernels.masked_linear_keep_backward(*args), R.masked_linear_keep_backward(*args), torch.float32)


def test_reference_linear_backward_kernels_check_the_estimator_and_temperature():
    """The kernel contract (backends/reference.py): backward kernels check the estimator and temperature
    (a module's, set after it was built, reaches them unchecked); the reference as the native kernels."""
    x, w, gy = randn(3, 5, seed=1), randn(4, 5, seed=2), randn(3, 4, seed=3)
    scores, thr, cut = tied_scores((4, 5), seed=4)
    keep = R.keep_mask(scores, thr, cut)
    for estimator, temperature, match in (("bogus", 1.0, "estimator"), ("sigmoid", 0.0, "temperature")):
        with pytest.raises(ValueError, match=match):
            R.masked_linear_backward(gy, x, w, scores, thr, cut, estimator, temperature, [True] * 4)
        with pytest.raises(ValueError, match=match):
            R.masked_linear_keep_backward(gy, x, w, scores, keep, estimator, temperature, [True] * 4)
