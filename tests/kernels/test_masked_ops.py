"""Masked ops through the public API: forward equals the dense op on W * M, gradients equal the
explicitly written straight-through formulas, float64 gradcheck, threshold vs top-k semantics."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bise_kernels as bk
from _oracle import sort_mask


def _slope(scores, estimator, temperature):
    if estimator == "ste":
        return torch.ones_like(scores)
    sig = torch.sigmoid(scores / temperature)
    return sig * (1 - sig) / temperature


def _expected_layer_grads(op, x, weight, bias, scores, mask, grad_y, estimator, temperature):
    """Gradients by hand: autograd through the dense op on a leaf W_eff, then the STE rule."""
    m = mask if mask.dim() == weight.dim() else mask.reshape((-1,) + (1,) * (weight.dim() - 1))
    w_eff = (weight * m).detach().requires_grad_()
    x_ = x.detach().requires_grad_()
    b_ = None if bias is None else bias.detach().requires_grad_()
    op(x_, w_eff, b_).backward(grad_y)
    g = w_eff.grad * weight
    if scores.dim() != weight.dim():
        g = g.reshape(weight.shape[0], -1).sum(1)
    return x_.grad, w_eff.grad * m, None if b_ is None else b_.grad, g * _slope(scores, estimator, temperature)


@pytest.mark.parametrize("granularity", ["weight", "channel"])
@pytest.mark.parametrize("estimator", ["ste", "sigmoid"])
def test_masked_linear_forward_and_gradients(backend, granularity, estimator):
    torch.manual_seed(0)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    shape = weight.shape if granularity == "weight" else (6,)
    scores = torch.randint(-2, 3, shape).double().requires_grad_()  # ties at the threshold
    y = bk.masked_linear(x, weight, bias, scores, density=0.5, estimator=estimator, temperature=0.7)
    mask = sort_mask(scores.detach(), round(0.5 * scores.numel()))
    m = mask if granularity == "weight" else mask[:, None]
    torch.testing.assert_close(y, F.linear(x, weight * m, bias), rtol=0, atol=1e-12)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    expected = _expected_layer_grads(F.linear, x, weight, bias, scores.detach(), mask, grad_y, estimator, 0.7)
    for got, want in zip((x.grad, weight.grad, bias.grad, scores.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_masked_conv2d_forward_and_gradients(backend, granularity):
    torch.manual_seed(1)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(weight.shape if granularity == "weight" else (6,), dtype=torch.float64, requires_grad=True)
    conv = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    y = bk.masked_conv2d(x, weight, bias, scores, threshold=0.1, estimator="sigmoid", temperature=0.5, **conv)
    mask = scores.detach() >= 0.1
    op = lambda a, w, b: F.conv2d(a, w, b, **conv)  # noqa: E731
    m = mask if granularity == "weight" else mask[:, None, None, None]
    torch.testing.assert_close(y, op(x, weight * m, bias), rtol=0, atol=1e-12)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    expected = _expected_layer_grads(op, x, weight, bias, scores.detach(), mask, grad_y, "sigmoid", 0.5)
    for got, want in zip((x.grad, weight.grad, bias.grad, scores.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "last_dim"])
def test_channel_gate_forward_and_gradients(backend, layout):
    torch.manual_seed(2)
    if layout == "last_dim":
        x, dim = torch.randn(5, 6, dtype=torch.float64), -1
    else:
        x, dim = torch.randn(2, 6, 3, 4, dtype=torch.float64), 1
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    scores = torch.tensor([0.5, -0.2, 0.0, -0.0, 1.0, -3.0], dtype=torch.float64, requires_grad=True)
    y = bk.channel_gate(x, scores, temperature=0.3)
    gate = (scores.detach() >= 0).double()
    shape = [1] * x.dim()
    shape[dim] = 6
    torch.testing.assert_close(y, x * gate.reshape(shape), rtol=0, atol=0)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    dims = [d for d in range(x.dim()) if d != dim % x.dim()]
    expected_scores = (grad_y * x.detach()).sum(dims) * _slope(scores.detach(), "sigmoid", 0.3)
    torch.testing.assert_close(x.grad, grad_y * gate.reshape(shape), rtol=0, atol=0)
    torch.testing.assert_close(scores.grad, expected_scores, rtol=1e-10, atol=1e-12)


def test_channel_gate_with_density_keeps_top_channels(backend):
    x = torch.ones(1, 4, 2)
    y = bk.channel_gate(x, torch.tensor([0.1, 0.4, 0.4, -1.0]), density=0.5)
    assert y[0, :, 0].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_threshold_mode_keeps_every_tie(backend):
    x, w = torch.eye(4), torch.ones(4, 4)
    scores = torch.tensor([0.0, 0.0, -1.0, 0.0]).repeat(4, 1)
    y = bk.masked_linear(x, w, None, scores, threshold=0.0)
    assert torch.equal(y, (scores >= 0).float().t() @ torch.eye(4) * 1.0)


def test_gradcheck_in_float64(backend):
    torch.manual_seed(3)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(5, 4, dtype=torch.float64)
    fn = lambda x, w, b: bk.masked_linear(x, w, b, scores, density=0.6)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    xc = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    wc = torch.randn(3, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    sc = torch.randn(3, dtype=torch.float64)
    fn = lambda x, w: bk.masked_conv2d(x, w, None, sc, density=0.67, padding=1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (xc, wc))
    gs = torch.randn(2, dtype=torch.float64)
    fn = lambda x: bk.channel_gate(x, gs, dim=1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (torch.randn(3, 2, dtype=torch.float64, requires_grad=True),))


def test_frozen_weights_get_no_gradient_and_are_not_changed(backend):
    w = torch.randn(3, 4)
    before = w.clone()
    scores = torch.randn(3, 4, requires_grad=True)
    bk.masked_linear(torch.randn(2, 4), w, None, scores, density=0.5).sum().backward()
    assert w.grad is None and torch.equal(w, before) and scores.grad is not None


def test_batched_leading_dims_in_linear(backend):
    x = torch.randn(2, 3, 4, requires_grad=True)
    w, s = torch.randn(5, 4), torch.randn(5, 4, requires_grad=True)
    y = bk.masked_linear(x, w, None, s, density=0.5)
    y2 = bk.masked_linear(x.reshape(6, 4), w, None, s, density=0.5).reshape(2, 3, 5)
    torch.testing.assert_close(y, y2)
    y.sum().backward()
    assert s.grad.shape == s.shape and x.grad.shape == x.shape


def test_unbatched_conv_input_as_nn_conv2d(backend):
    """An unbatched x (C, H, W) gives the batch-of-one result without its batch dim, as nn.Conv2d
    does (module, both mask modes, and the functional op), gradients included."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 6)
    for mode in ("selection", "keep"):
        layer = bk.MaskedConv2d(2, 3, 3, padding=1, density=0.5, mask_mode=mode)
        y = layer(x)
        assert y.shape == nn.Conv2d(2, 3, 3, padding=1)(x).shape
        torch.testing.assert_close(y, layer(x[None])[0], rtol=0, atol=0)
        y.square().sum().backward()
        unbatched, layer.scores.grad = layer.scores.grad, None
        layer(x[None]).square().sum().backward()
        torch.testing.assert_close(unbatched, layer.scores.grad, rtol=0, atol=0)
    w, s = torch.randn(3, 2, 3, 3), torch.randn(3)
    torch.testing.assert_close(bk.masked_conv2d(x, w, None, s, density=0.5, stride=2),
                               bk.masked_conv2d(x[None], w, None, s, density=0.5, stride=2)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="4-d"):
        bk.masked_conv2d(x[0], w, None, s, density=0.5)


def _layers():
    """A layer per op and mask mode, with an input: (name, layer, x)."""
    torch.manual_seed(0)
    cases = []
    for mode in ("selection", "keep"):
        cases.append((f"linear-{mode}", bk.MaskedLinear(5, 4, density=0.5, mask_mode=mode), torch.randn(2, 5)))
        cases.append((f"conv-{mode}", bk.MaskedConv2d(2, 3, 3, padding=1, threshold=0.0, mask_mode=mode),
                      torch.randn(2, 2, 4, 4)))
    cases.append(("gate", bk.ChannelGate(3, init=0.5), torch.randn(2, 3, 4)))
    return cases


class _CustomOpPath(torch.overrides.TorchFunctionMode):
    """Any active mode makes the ops take their torch.library custom ops (bise_kernels._ops._plain_eager)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("loss", ["square", "linear"])
@pytest.mark.parametrize("path", ["eager", "custom-op"])
def test_double_backward_is_a_named_error_on_every_backend(backend, path, loss):
    """The straight-through gradient has no gradient of its own: a second backward through a layer
    (create_graph=True) raises naming the op, on every path, instead of an answer that differed per
    backend (the eager paths differentiated what their kernels happened to compute). A first-order
    gradient taken with create_graph=True is the same as without. (torch.compile refuses double
    backward itself.) A loss linear in the output (grad_y a constant with no graph of its own) too: the
    gradient still depends on the saved x, weight and scores, so differentiating it with respect to the
    weight or the scores (a gradient penalty) raises, not torch's "does not require grad" or a silent None."""
    def objective(y):
        return y.square().sum() if loss == "square" else y.sum()

    for name, layer, x in _layers():
        x = x.requires_grad_()
        plain, = torch.autograd.grad(objective(layer(x)), x)
        with _CustomOpPath() if path == "custom-op" else contextlib.nullcontext():
            grad_x, = torch.autograd.grad(objective(layer(x)), x, create_graph=True)
        torch.testing.assert_close(grad_x, plain, rtol=0, atol=0, msg=name)
        assert grad_x.requires_grad, name
        for p in (getattr(layer, "weight", None), layer.scores):
            if p is not None:
                with pytest.raises(RuntimeError, match="differentiable once"):
                    torch.autograd.grad(grad_x.sum(), p.requires_grad_(), allow_unused=True)


def test_torch_func_grad_equals_autograd_on_every_backend(backend):
    """torch.func.grad over a layer's parameters (functional_call) and over the functional API gives
    autograd's gradients, for every layer, mask mode and a global top-k; the layers' caches stand
    aside (a transform's tensors have no storage) and stay right for eager calls after it. torch's
    custom-op autograd is refused under a transform, so the ops run their own autograd.Function."""
    from torch.func import functional_call, grad

    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    bk.mask_model(net, density=0.4, scope="global")
    for name, layer, x in _layers() + [("global", net, torch.randn(3, 6))]:
        params = dict(layer.named_parameters())
        for p in params.values():
            p.requires_grad_()  # the frozen weights too: a transform differentiates whatever it is given
        layer.zero_grad()
        layer(x).square().sum().backward()
        got = grad(lambda p: functional_call(layer, p, (x,)).square().sum())(
            {k: v.detach() for k, v in params.items()})
        for k, p in params.items():
            torch.testing.assert_close(got[k], p.grad, msg=f"{name} {k}")
        before = layer(x)
        if hasattr(layer, "scores"):
            with torch.no_grad():
                layer.scores.neg_()
            torch.testing.assert_close(layer(x), functional_call(layer, {k: v.detach() for k, v in params.items()},
                                                                 (x,)), msg=name)
            assert not torch.equal(layer(x), before), name
    x, w, s = torch.randn(2, 5), torch.randn(4, 5), torch.randn(4, 5)
    got = grad(lambda s: bk.masked_linear(x, w, None, s, density=0.5).square().sum())(s)
    s.requires_grad_()
    bk.masked_linear(x, w, None, s, density=0.5).square().sum().backward()
    torch.testing.assert_close(got, s.grad)


def test_torch_func_second_order_and_vmap_are_named_errors(backend):
    from torch.func import grad, vmap

    layer = bk.MaskedLinear(5, 4, density=0.5)
    x = torch.randn(2, 5)
    once = lambda s: grad(lambda t: bk.masked_linear(x, layer.weight, None, t, density=0.5).square().sum())(s)  # noqa: E731
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad(lambda s: once(s).sum())(layer.scores.detach())
    with pytest.raises(RuntimeError, match="vmap over masked_linear"):
        vmap(layer)(torch.randn(3, 2, 5))


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_masked_layers_run_under_autocast_as_the_dense_ones(backend, granularity):
    """Under torch.autocast a masked layer computes in the autocast dtype like nn.Linear / nn.Conv2d,
    so it takes the lower-precision output of a dense layer before it (x bfloat16, weight float32 was
    a "weight has dtype" error): the same bits as the op called with x, weight, bias cast by hand;
    weight and score gradients keep the parameters' dtype."""
    torch.manual_seed(0)
    for layer, x in ((bk.MaskedLinear(6, 4, granularity=granularity, density=0.5), torch.randn(3, 6)),
                     (bk.MaskedConv2d(2, 4, 3, padding=1, granularity=granularity, threshold=0.0),
                      torch.randn(2, 2, 5, 5))):
        dense = nn.Linear(6, 6) if isinstance(layer, nn.Linear) else nn.Conv2d(2, 2, 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = dense(x)
            y = layer(h)
        assert h.dtype == y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert layer.weight.grad.dtype == layer.scores.grad.dtype == torch.float32
        cast = [t.detach().bfloat16() for t in (h, layer.weight, layer.bias)]
        if isinstance(layer, nn.Linear):
            want = bk.masked_linear(*cast, layer.scores, density=0.5)
        else:
            want = bk.masked_conv2d(*cast, layer.scores, threshold=0.0, padding=1)
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            functional = (bk.masked_linear(h, layer.weight, layer.bias, layer.scores, density=0.5)
                          if isinstance(layer, nn.Linear) else
                          bk.masked_conv2d(h, layer.weight, layer.bias, layer.scores, threshold=0.0, padding=1))
        torch.testing.assert_close(functional, want, rtol=0, atol=0)


def test_float64_masked_layers_are_left_alone_by_autocast(backend):
    """torch.autocast leaves float64 tensors alone (nn.Linear / nn.Conv2d stay float64), and so do the masked
    layers and ops: the same float64 bits, forward and gradients, as without autocast."""
    torch.manual_seed(0)
    f64 = torch.float64
    for layer, x, dense in ((bk.MaskedLinear(6, 4, density=0.5, dtype=f64), torch.randn(3, 6, dtype=f64),
                             nn.Linear(6, 4, dtype=f64)),
                            (bk.MaskedConv2d(2, 4, 3, padding=1, threshold=0.0, dtype=f64),
                             torch.randn(2, 2, 5, 5, dtype=f64), nn.Conv2d(2, 4, 3, dtype=f64))):
        op = ((lambda: bk.masked_linear(x, layer.weight, layer.bias, layer.scores, density=0.5))
              if isinstance(layer, nn.Linear) else
              (lambda: bk.masked_conv2d(x, layer.weight, layer.bias, layer.scores, threshold=0.0, padding=1)))
        want, want_op = layer(x), op()
        want.sum().backward()
        want_grads = [p.grad.clone() for p in (layer.weight, layer.scores)]
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert dense(x).dtype == f64  # what the masked layers follow
            y, y_op = layer(x), op()
        assert y.dtype == y_op.dtype == f64
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        torch.testing.assert_close(y_op, want_op, rtol=0, atol=0)
        y.sum().backward()
        for p, g in zip((layer.weight, layer.scores), want_grads):  # weight float64, scores their float32
            assert p.grad.dtype == p.dtype
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
