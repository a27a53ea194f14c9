"""Triton channel gate kernels against the reference backend: y, grad_x and grad_scores.

NCHW, channels_last, dim=-1 on 2-d, 3-d with small channel counts (several rows of a tile share
a channel), dim=0, non-dense inputs, grad_y in another layout than x; ties with a finite cut.
"""

import pytest
import torch

pytest.importorskip("triton")

from bise_kernels.backends import reference as ref  # noqa: E402
from bise_kernels.backends.triton import channel_gate  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-3, atol=1e-3),  # grad_scores: reference and kernel both accumulate in fp32
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}
LAYOUTS = {  # name: (shape, dim, channels_last)
    "nchw": ((3, 7, 5, 6), 1, False),
    "channels_last": ((3, 7, 5, 6), 1, True),
    "last_dim_2d": ((37, 11), -1, False),
    "3d_few_channels": ((5, 3, 13), 1, False),
    "dim0": ((9, 4, 3), 0, False),
}


def _inputs(name, dtype=torch.float32, seed=0):
    shape, dim, channels_last = LAYOUTS[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    channels = shape[dim]
    scores = torch.tensor([0.5, 0.0, 0.5, -0.5, 1.0, 0.0, -1.0, 0.5, 0.0, 2.0, 0.0][:channels])
    values = torch.sort(scores, descending=True).values
    k = next(k for k in range(1, channels) if values[k - 1] == values[k])  # k-th largest has a tie after it
    thr, cut = ref.topk_select([scores], k)
    ties = scores == thr
    assert 0 < ref.keep_mask(scores, thr, cut)[ties].sum() < ties.sum()  # the cut splits the ties
    return x.to(DEVICE), scores.to(DEVICE), thr.to(DEVICE), cut.to(DEVICE), dim


def _check(x, scores, thr, cut, dim, estimator, needs=(True, True), grad_y=None):
    dtype = x.dtype
    rdim = dim % x.dim()
    y = channel_gate.channel_gate_forward(x, scores, thr, cut, dim)
    assert torch.equal(y, ref.channel_gate_forward(x, scores, thr, cut, rdim))  # exact: x * 0 or x * 1
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        assert y.stride() == x.stride()  # the memory format is kept
    if grad_y is None:
        grad_y = torch.randn(x.shape, generator=torch.Generator().manual_seed(9)).to(device=x.device, dtype=dtype)
    got = channel_gate.channel_gate_backward(grad_y, x, scores, thr, cut, dim, estimator, 0.3, list(needs))
    want = ref.channel_gate_backward(grad_y, x, scores, thr, cut, rdim, estimator, 0.3, list(needs))
    if needs[0]:
        assert torch.equal(got[0], want[0])
    else:
        assert got[0] is None
    if needs[1]:
        assert got[1].dtype == scores.dtype
        torch.testing.assert_close(got[1], want[1], **TOL[dtype])
    else:
        assert got[1] is None


@pytest.mark.parametrize("estimator", ["ste", "sigmoid"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_channel_gate_matches_reference(layout, estimator):
    _check(*_inputs(layout), estimator)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_channel_gate_dtypes(layout, dtype):
    _check(*_inputs(layout, dtype), "sigmoid")


@pytest.mark.parametrize("needs", [(True, False), (False, True)])
@pytest.mark.parametrize("layout", ["nchw", "last_dim_2d"])
def test_channel_gate_computes_only_the_needed_gradients(layout, needs):
    _check(*_inputs(layout), "sigmoid", needs)


def test_channel_gate_grad_in_another_layout_and_strided_input():
    x, scores, thr, cut, dim = _inputs("channels_last")
    _check(x, scores, thr, cut, dim, "sigmoid", grad_y=torch.randn(x.shape, device=DEVICE))  # NCHW grad_y
    strided = torch.randn(3, 7, 10, 6, device=DEVICE)[:, :, ::2]  # not dense: copied, still correct
    _check(strided, scores, thr, cut, 1, "ste")


def test_channel_gate_large_reduce_axis_splits_over_programs():
    x = torch.randn(600, 5, device=DEVICE)  # several programs add into each channel's gradient
    scores = torch.tensor([0.3, -1.0, 0.3, 2.0, 0.3], device=DEVICE)
    thr, cut = ref.topk_select([scores.cpu()], 2)
    _check(x, scores, thr.to(DEVICE), cut.to(DEVICE), 1, "sigmoid")


def test_channel_gate_rejects_bad_input_before_launch():
    x, scores, thr, cut, dim = _inputs("nchw")
    with pytest.raises(ValueError, match="scores must have shape"):
        channel_gate.channel_gate_forward(x, scores[1:], thr, cut, dim)
    with pytest.raises(ValueError, match="dim must be in"):
        channel_gate.channel_gate_forward(x, scores, thr, cut, 4)
    with pytest.raises(TypeError, match="x must be a floating"):
        channel_gate.channel_gate_forward(x.int(), scores, thr, cut, dim)
    with pytest.raises(TypeError, match="thr must be"):
        channel_gate.channel_gate_forward(x, scores, thr.half(), cut, dim)
    with pytest.raises(ValueError, match="grad_y must have shape"):
        channel_gate.channel_gate_backward(x[1:], x, scores, thr, cut, dim, "ste", 1.0, [True, True])
    with pytest.raises(TypeError, match="grad_y has dtype"):
        channel_gate.channel_gate_backward(x.half(), x, scores, thr, cut, dim, "ste", 1.0, [True, True])
    with pytest.raises(ValueError, match="needs must have 2"):
        channel_gate.channel_gate_backward(x, x, scores, thr, cut, dim, "ste", 1.0, [True])
