"""The packed-mask masked conv2d (``masked_conv2d_keep``) against the reference on every backend that
has it, the same bits as the selection path, and MaskedConv2d's mask modes. Op schemas:
test_opcheck.py; the extension's argument errors (the same ``keep_weight`` / ``keep_score_grad`` ops
as the packed-mask linear): test_native_checks.py."""

import itertools

import pytest
import torch

import bise_kernels as bk
from _masked_cases import (CONV_CASES, DTYPES, assert_compiles_and_exports, assert_grads,
                           assert_keep_trains_like_selection, randn, tied_scores, tol)
from bise_kernels import _ops
from bise_kernels.backends import reference as R


def _conv_keep_kernels(kernels):
    if not hasattr(kernels, "masked_conv2d_keep_forward"):
        pytest.skip(f"backend {kernels.name!r} has no masked_conv2d_keep kernels")


def _layer(dtype, structured, device, groups=1, channels_last=False):
    x = randn(2, 6, 9, 11, dtype=dtype, seed=1, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = randn(9, 6 // groups, 3, 2, dtype=dtype, seed=2, device=device), randn(9, dtype=dtype, seed=3, device=device)
    scores, thr, cut = tied_scores((9,) if structured else w.shape, seed=4, device=device)
    return x, w, b, scores, thr, cut


@pytest.mark.parametrize("conv_case", CONV_CASES)
@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_keep_matches_reference(kernels, conv_case, structured, channels_last):
    _conv_keep_kernels(kernels)
    stride, padding, dilation, groups = conv_case
    x, w, b, scores, thr, cut = _layer(torch.float32, structured, kernels.device, groups, channels_last)
    keep = R.keep_mask(scores, thr, cut)
    conv = (list(stride), list(padding), list(dilation), groups)
    want = R.masked_conv2d_keep_forward(x, w, b, keep, *conv)
    torch.testing.assert_close(kernels.masked_conv2d_keep_forward(x, w, b, keep, *conv), want, **tol(torch.float32))
    args = (randn(*want.shape, seed=5, device=kernels.device), x, w, scores, keep, *conv, "sigmoid", 0.5,
            [True, True, True, True])
    assert_grads(kernels.masked_conv2d_keep_backward(*args), R.masked_conv2d_keep_backward(*args), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("needs", [n for n in itertools.product([False, True], repeat=4) if any(n)][::3])
def test_conv_keep_dtypes_and_needs(kernels, dtype, needs):
    _conv_keep_kernels(kernels)
    x, w, b, scores, thr, cut = _layer(dtype, False, kernels.device)
    keep = R.keep_mask(scores, thr, cut)
    conv = ([2, 1], [1, 2], [2, 1], 1)
    want = R.masked_conv2d_keep_forward(x, w, b, keep, *conv)
    torch.testing.assert_close(kernels.masked_conv2d_keep_forward(x, w, b, keep, *conv), want, **tol(dtype))
    args = (randn(*want.shape, dtype=dtype, seed=5, device=kernels.device), x, w, scores, keep, *conv, "ste", 1.0,
            list(needs))
    assert_grads(kernels.masked_conv2d_keep_backward(*args), R.masked_conv2d_keep_backward(*args), dtype)


@pytest.mark.parametrize("structured", [False, True])
def test_conv_keep_op_equals_the_selection_op(backend, structured):
    """Same output and gradients as masked_conv2d with the selection the mask was packed from, to the bit
    where both ops run the same composition (not "triton": its masked conv is its own kernel)."""
    x, w, b, scores, thr, cut = _layer(torch.float32, structured, "cpu", groups=3)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, scores)]
    conv = ([1, 1], [1, 1], [1, 1], 3)
    y = _ops.masked_conv2d(*leaves, thr, cut, *conv, "sigmoid", 0.7)
    want = (y, *torch.autograd.grad(y.square().sum(), leaves))
    y = _ops.masked_conv2d_keep(*leaves, _ops.keep_mask(scores, thr, cut, 0), *conv, "sigmoid", 0.7)
    got = (y, *torch.autograd.grad(y.square().sum(), leaves))
    exact = {} if backend == "triton" else dict(rtol=0, atol=0)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, **exact)


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_masked_conv2d_keep_mode_trains_like_the_selection_mode(backend, granularity):
    torch.manual_seed(0)
    layers = [bk.MaskedConv2d(4, 6, 3, stride=2, padding=1, granularity=granularity, density=0.4,
                              estimator="sigmoid", mask_mode=mode) for mode in ("selection", "keep")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(2, 4, 7, 7)
    assert_keep_trains_like_selection(layers, x, backend)


def test_conv_mask_mode_is_checked():
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        bk.MaskedConv2d(3, 2, 3, density=0.5, mask_mode="packed")
    assert bk.MaskedConv2d(3, 2, 3, density=0.5).mask_mode == "auto"
    assert bk.MaskedConv2d.from_dense(torch.nn.Conv2d(3, 2, 3), density=0.5).mask_mode == "auto"


def test_conv_keep_mode_compiles_and_exports(backend):
    """torch.compile (fullgraph) and torch.export see masked_conv2d_keep and give eager's results."""
    torch.manual_seed(0)
    layer = bk.MaskedConv2d(3, 5, 3, padding=1, density=0.4, estimator="sigmoid", mask_mode="keep")
    x = torch.randn(2, 3, 6, 6)
    assert_compiles_and_exports(layer, x, "masked_conv2d_keep")
