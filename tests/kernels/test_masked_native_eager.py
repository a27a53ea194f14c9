"""The eager path of the layer ops on the "cpp" backend: one extension op each with a C++ autograd
node (csrc/masked_autograd.cpp). Its outputs and every gradient subset equal, to the bit, the
custom op's (the Python autograd formula over backends/native.py); bad input gets a named error.
(tests/kernels/test_opcheck.py compares the two paths on every backend; this file covers what
only the C++ node decides: which gradients it computes, and its argument checks.)"""

from __future__ import annotations

import itertools

import pytest
import torch

import bise_kernels as bk
from _cuda_graph import capture
from bise_kernels import _ops, backends

if "cpp" not in backends.available_backends("cpu"):
    pytest.skip("the compiled extension is unavailable", allow_module_level=True)

from bise_kernels._extension import ext_ops  # noqa: E402

EXT = ext_ops()


def _t(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _layer_cases(dtype=torch.float32):
    """(name, op of bise_kernels._ops, args with leaves x, weight, bias, scores at positions 0-3)."""
    x, w, b, s = _t(2, 3, 5, seed=0, dtype=dtype), _t(6, 5, seed=1, dtype=dtype), _t(6, seed=2, dtype=dtype), \
        _t(6, 5, seed=3, dtype=dtype)
    thr, cut = bk.topk_select(s, 13)
    su = _t(6, seed=4, dtype=dtype)
    xc, wc, bc, sc = _t(2, 4, 7, 6, seed=5, dtype=dtype), _t(6, 2, 3, 2, seed=6, dtype=dtype), \
        _t(6, seed=7, dtype=dtype), _t(6, 2, 3, 2, seed=8, dtype=dtype)
    thr_c, cut_c = bk.topk_select(sc, 40)
    xcl = xc.to(memory_format=torch.channels_last)
    conv = ([2, 1], [1, 2], [1, 2], 2)
    xg, sg = _t(2, 6, 5, seed=9, dtype=dtype), _t(6, seed=10, dtype=dtype)
    thr_g, cut_g = bk.topk_select(sg, 4)
    return [
        ("linear", _ops.masked_linear, (x, w, b, s, thr, cut, "ste", 1.0)),
        ("linear_sigmoid_structured", _ops.masked_linear, (x, w, b, su, *bk.topk_select(su, 3), "sigmoid", 0.7)),
        ("linear_keep", _ops.masked_linear_keep, (x, w, b, s, s > 0.1, "sigmoid", 0.5)),
        ("conv2d", _ops.masked_conv2d, (xc, wc, bc, sc, thr_c, cut_c, *conv, "sigmoid", 0.5)),
        ("conv2d_channels_last", _ops.masked_conv2d, (xcl, wc, bc, sc, thr_c, cut_c, *conv, "ste", 1.0)),
        ("conv2d_keep", _ops.masked_conv2d_keep, (xc, wc, bc, sc, sc > 0, *conv, "ste", 1.0)),
        ("gate", _ops.channel_gate, (xg, sg, thr_g, cut_g, 1, "sigmoid", 0.5)),
    ]


def _leaves(name: str, args: tuple, grads: tuple[bool, ...]) -> tuple[tuple, list[torch.Tensor]]:
    """``args`` with fresh leaves at the differentiable positions, ``grads`` saying which require grad."""
    positions = (0, 1) if name == "gate" else (0, 1, 2, 3)
    args = list(args)
    for i, needed in zip(positions, grads):
        args[i] = args[i].detach().clone().requires_grad_(needed)
    return tuple(args), [args[i] for i, needed in zip(positions, grads) if needed]


GRAD_SUBSETS = [g for g in itertools.product((False, True), repeat=4) if any(g)]


@pytest.mark.parametrize("subset", GRAD_SUBSETS, ids=lambda g: "".join("xwbs"[i] for i in range(4) if g[i]))
@pytest.mark.parametrize("case", [c[0] for c in _layer_cases()])
def test_every_gradient_subset_equals_the_custom_op(case, subset):
    """Inputs requiring grad or not (frozen weights, no bias gradient, ...): the C++ node computes
    the gradients asked for and they equal the custom op's to the bit; so does the output."""
    name, call, args = next(c for c in _layer_cases() if c[0] == case)
    if name == "gate" and any(subset[2:]):
        pytest.skip("the gate has two inputs")
    with bk.use_backend("cpp"):
        results = []
        for fn in (call, call.op):
            inputs, leaves = _leaves(name, args, subset)
            y = fn(*inputs)
            grad_y = _t(*y.shape, seed=11).t().contiguous().t() if y.dim() == 2 else _t(*y.shape, seed=11)
            results.append((y, *torch.autograd.grad(y, leaves, grad_y)))
        assert "bise_autograd" in fn_grad_name(call, args), "the native path did not run"
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def fn_grad_name(call, args) -> str:
    inputs, _ = _leaves("gate" if call is _ops.channel_gate else "layer", args, (True, True, True, True))
    return call(*inputs).grad_fn.name()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_equal_the_custom_op(dtype):
    with bk.use_backend("cpp"):
        for name, call, args in _layer_cases(dtype):
            results = []
            for fn in (call, call.op):
                inputs, leaves = _leaves(name, args, (True, True, True, True))
                y = fn(*inputs)
                y.sum().backward()
                results.append((y, *(leaf.grad for leaf in leaves)))
            for got, want in zip(*results):
                torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("shape", [(5,), (0, 5), "transposed"], ids=["1-d", "empty", "transposed"])
def test_odd_linear_inputs_equal_the_custom_op(shape):
    """A 1-d x, an empty batch, a non-contiguous x; fp16 weights with fp32 scores."""
    x = _t(5, 4, seed=0).t() if shape == "transposed" else _t(*shape, seed=0)
    w, s = _t(6, 5, seed=1), _t(6, 5, seed=2)
    for dtype in (torch.float32, torch.float16):
        args = (x.to(dtype), w.to(dtype), _t(6, seed=3, dtype=dtype), s, *bk.topk_select(s, 13), "sigmoid", 0.5)
        with bk.use_backend("cpp"):
            results = []
            for fn in (_ops.masked_linear, _ops.masked_linear.op):
                inputs, leaves = _leaves("linear", args, (True, True, True, True))
                y = fn(*inputs)
                results.append((y, *torch.autograd.grad(y.sum(), leaves)))
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_backend_selects_the_path():
    """The native op runs on "cpp" and "auto" (= cpp on the CPU); on "torch" the reference runs."""
    _, call, args = _layer_cases()[0]
    inputs, _ = _leaves("linear", args, (True, True, True, True))
    for backend, native in (("cpp", True), ("auto", True), ("torch", False), ("cpp", True)):
        with bk.use_backend(backend):
            y = call(*inputs)
        assert ("bise_autograd" in y.grad_fn.name()) == native, (backend, y.grad_fn.name())


def test_no_grad_and_module_calls():
    """No node without grad (same output); a MaskedLinear's step goes through the native op."""
    _, call, args = _layer_cases()[0]
    with bk.use_backend("cpp"):
        with torch.no_grad():
            y = call(*args)
        assert y.grad_fn is None
        torch.testing.assert_close(y, call.op(*args), rtol=0, atol=0)
        layer = bk.MaskedLinear(5, 6, density=0.5)
        out = layer(torch.randn(4, 5))
        assert "bise_autograd" in out.grad_fn.name()
        out.sum().backward()
        assert layer.scores.grad is not None and layer.weight.grad is not None


def _bad(op: str, position: int, value, match: str, error: type = ValueError):
    """A bad argument and its error: TypeError for a dtype or kind of tensor, as bise_kernels/_checks.py."""
    return pytest.param(op, position, value, match, error, id=f"{op}-{match[:24]}")


_X, _W, _S = _t(3, 5, seed=0), _t(6, 5, seed=1), _t(6, 5, seed=2)
_SEL = (torch.zeros(()), torch.tensor(4))
_LINEAR = (_X, _W, None, _S, *_SEL, "ste", 1.0)
_KEEP = (_X, _W, None, _S, _S > 0, "ste", 1.0)
_CONV = (_t(1, 2, 5, 5, seed=3), _t(4, 2, 3, 3, seed=4), None, _t(4, seed=5), *_SEL, [1, 1], [0, 0], [1, 1], 1,
         "ste", 1.0)
_GATE = (_t(2, 6, 5, seed=6), _t(6, seed=7), *_SEL, 1, "ste", 1.0)


@pytest.mark.parametrize("op, position, value, match, error", [
    _bad("masked_linear", 0, _X.double(), "weight has dtype Float but x has Double", TypeError),
    _bad("masked_linear", 0, _t(3, 4, seed=0), r"x of shape \[3, 4\] does not match weight of shape \[6, 5\]"),
    _bad("masked_linear", 0, torch.ones(3, 5, dtype=torch.int32), "x must be float32/float64/float16/bfloat16",
         TypeError),
    _bad("masked_linear", 0, _X.to("meta"), "weight must be a meta tensor"),
    _bad("masked_linear", 2, _t(5, seed=0), r"bias must have shape \(6,\), got \[5\]"),
    _bad("masked_linear", 2, _t(6, 1, seed=0), r"bias must have shape \(6,\), got \[6, 1\]"),
    _bad("masked_conv2d", 2, _t(4, 1, seed=0), r"bias must have shape \(4,\), got \[4, 1\]"),
    _bad("masked_linear", 2, _t(6, seed=0).double(), "bias has dtype Double but x has Float", TypeError),
    _bad("masked_linear", 3, _t(5, 6, seed=0), r"scores must have weight's shape \[6, 5\] or \(6,\)"),
    _bad("masked_linear", 4, torch.zeros((), dtype=torch.float64), "thr must have the scores' dtype", TypeError),
    _bad("masked_linear", 6, "straight", "estimator must be 'ste' or 'sigmoid', got 'straight'"),
    _bad("masked_linear", 7, 0.0, "temperature must be a positive finite float"),
    _bad("masked_linear_keep", 4, (_S > 0).float(), "keep must be a bool tensor, got Float", TypeError),
    _bad("masked_linear_keep", 3, _t(6, seed=0), r"scores must have keep's shape \[6, 5\], got \[6\]"),
    # the keep ops' forward reads only keep, but checks the scores the backward will read
    _bad("masked_linear_keep", 3, torch.ones(6, 5, dtype=torch.int32),
         "scores must be float32/float64/float16/bfloat16", TypeError),
    _bad("masked_conv2d", 0, _t(2, 5, 5, seed=0), "x and weight must be 4-d"),
    _bad("masked_conv2d", 0, _t(1, 3, 5, 5, seed=0), r"groups=1 does not fit x channels 3 and weight \[4, 2, 3, 3\]"),
    _bad("masked_conv2d", 9, 2, r"groups=2 does not fit x channels 2"),
    _bad("masked_conv2d", 6, [1, 0], r"stride must be two ints >= 1, got \[1, 0\]"),
    _bad("masked_conv2d", 7, [-1, 0], r"padding must be two ints >= 0, got \[-1, 0\]"),
    _bad("masked_conv2d", 8, [0, 1], r"dilation must be two ints >= 1, got \[0, 1\]"),
    _bad("masked_conv2d_keep_forward", 6, [1, 0], r"dilation must be two ints >= 1, got \[1, 0\]"),
    _bad("masked_conv2d", 0, _t(1, 2, 2, 5, seed=0),
         r"kernel \[3, 3\] \(dilation \[1, 1\]\) is larger than the padded"),
    _bad("masked_conv2d", 7, [2**62, 0], r"padding \[4611686018427387904, 0\] or dilation \[1, 1\] too large: the "
         r"padded input or the kernel's span overflows int64"),  # 2 * padding overflowed (undefined behaviour)
    _bad("masked_conv2d", 8, [1, 2**62], r"too large: the padded input or the kernel's span overflows int64"),
    _bad("masked_conv2d", 9, 2**62, r"groups=4611686018427387904 does not fit x channels 2"),
    _bad("masked_conv2d", 3, _t(3, seed=0), r"scores must have weight's shape \[4, 2, 3, 3\] or \(4,\)"),
    _bad("masked_conv2d_keep", 4, torch.ones(4, 2, 3, 2, dtype=torch.bool), "keep must have weight's shape"),
    _bad("channel_gate", 1, _t(5, seed=0), r"scores must have shape \(6,\) \(x.shape\[1\]\), got \[5\]"),
    _bad("channel_gate", 4, 3, r"dim must be in \[-3, 2\], got 3"),
    _bad("channel_gate", 5, "hard", "estimator must be 'ste' or 'sigmoid'"),
    # the forward and backward kernels of backends/native.py: the same checks
    _bad("masked_linear_forward", 0, _X.double(), "weight has dtype Float but x has Double", TypeError),
    _bad("masked_linear_forward", 2, _t(5, seed=0), r"bias must have shape \(6,\)"),
    _bad("masked_linear_backward", 3, _t(5, 6, seed=0), r"scores must have weight's shape \[6, 5\] or \(6,\)"),
    _bad("masked_linear_backward", 6, "straight", "estimator must be 'ste' or 'sigmoid', got 'straight'"),
    _bad("masked_linear_keep_forward", 3, (_S > 0).float(), "keep must be a bool tensor, got Float", TypeError),
    _bad("masked_linear_keep_backward", 3, _t(6, seed=0), r"scores must have keep's shape \[6, 5\], got \[6\]"),
    _bad("masked_conv2d_forward", 0, _t(2, 5, 5, seed=0), "x and weight must be 4-d"),
    _bad("masked_conv2d_backward", 11, 0.0, "temperature must be a positive finite float"),
    _bad("masked_conv2d_keep_forward", 3, torch.ones(4, 2, 3, 2, dtype=torch.bool), "keep must have weight's shape"),
    _bad("masked_conv2d_keep_backward", 4, torch.ones(4, 2, 3, 2, dtype=torch.bool), "keep must have weight's shape"),
    # the output gradient: the layer's output shape (a grad_y of the same numel passed before), x's dtype and device
    _bad("masked_linear_backward", 0, torch.ones(6, 3), r"grad_y must have the output's shape \[3, 6\], got \[6, 3\]"),
    _bad("masked_linear_backward", 0, torch.ones(3, 6, dtype=torch.float64), "grad_y has dtype Double but x has Float",
         TypeError),
    _bad("masked_linear_backward", 0, torch.ones(3, 6, device="meta"), "grad_y must be on x's device cpu"),
    _bad("masked_linear_keep_backward", 0, torch.ones(18), r"grad_y must have the output's shape \[3, 6\]"),
    _bad("masked_conv2d_backward", 0, torch.ones(1, 4, 9, 1), r"grad_y must have the output's shape \[1, 4, 3, 3\]"),
    _bad("masked_conv2d_backward", 0, torch.ones(1, 4, 3, 3).half(), "grad_y has dtype Half but x has Float",
         TypeError),
])
def test_bad_input_names_the_argument(op, position, value, match, error):
    conv_keep = (*_CONV[:4], torch.ones(4, 2, 3, 3, dtype=torch.bool), *_CONV[6:])
    needs = [True] * 4
    base = {"masked_linear": _LINEAR, "masked_linear_keep": _KEEP, "masked_conv2d": _CONV,
            "masked_conv2d_keep": conv_keep, "channel_gate": _GATE,
            "masked_linear_forward": _LINEAR[:6], "masked_linear_keep_forward": (*_KEEP[:3], _KEEP[4]),
            "masked_linear_backward": (torch.ones(3, 6), _X, _W, *_LINEAR[3:], needs),
            "masked_linear_keep_backward": (torch.ones(3, 6), _X, _W, *_KEEP[3:], needs),
            "masked_conv2d_forward": _CONV[:10], "masked_conv2d_keep_forward": (*conv_keep[:3], *conv_keep[4:9]),
            "masked_conv2d_backward": (torch.ones(1, 4, 3, 3), *_CONV[:2], *_CONV[3:], needs),
            "masked_conv2d_keep_backward": (torch.ones(1, 4, 3, 3), *conv_keep[:2], *conv_keep[3:], needs)}[op]
    args = list(base)
    args[position] = value
    with pytest.raises(error, match=match):
        getattr(EXT, op)(*args)



# ----------------------------------------------------------------------------- CUDA graphs (GPU only)


def _graph_step(mode: str):
    """A masked CNN (MaskedConv2d, ChannelGate, MaskedLinear in ``mode``, plus the functional
    masked_linear with a threshold) and its training step: forward, backward, in-place update of every
    trainable parameter (so each step selects anew)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(bk.MaskedConv2d(3, 8, 3, padding=1, density=0.5, mask_mode=mode),
                              bk.ChannelGate(8, temperature=0.5), torch.nn.Flatten(),
                              bk.MaskedLinear(8 * 6 * 6, 16, density=0.3, mask_mode=mode)).cuda()
    w, s = torch.randn(4, 16, device="cuda"), torch.randn(4, 16, device="cuda", requires_grad=True)
    x = torch.randn(2, 3, 6, 6, device="cuda")
    params = [p for p in net.parameters() if p.requires_grad] + [s]

    def step():
        loss = bk.masked_linear(net(x), w, None, s, threshold=0.0).square().mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(0.1 * g)
        return loss

    return step, params


@pytest.fixture
def deterministic_cudnn():
    """The conv's weight gradient from a deterministic cuDNN algorithm (a graph replay and an eager
    step must train to the same values; some wgrad algorithms accumulate with atomics)."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        yield


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["selection", "keep"])
def test_masked_training_step_is_captured_in_a_cuda_graph(mode, deterministic_cudnn):
    """No host sync anywhere in a masked step: it is captured, and replaying it trains as eager steps do."""
    eager_step, eager_params = _graph_step(mode)
    step, params = _graph_step(mode)
    graph, loss = capture(step, warmups=3)
    for _ in range(3):  # the warm-up steps (capturing runs nothing)
        eager_step()
    for _ in range(3):
        graph.replay()
        eager_loss = eager_step()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss, eager_loss)
    for got, want in zip(params, eager_params):
        torch.testing.assert_close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_threshold_first_seen_in_a_capture_is_right_eagerly_after():
    """functional._device_scalar shares one (thr, cut) pair per threshold value. Made during a CUDA
    graph capture, its fill would only be recorded: it is not shared then, so an eager call after
    the capture (before any replay) still sees the threshold's value."""
    w, s = torch.randn(4, 16, device="cuda"), torch.randn(4, 16, device="cuda")
    x = torch.randn(2, 16, device="cuda")
    threshold = 0.1234567  # a value no other test uses: the capture is its first call
    graph, captured = capture(lambda: bk.masked_linear(x, w, None, s, threshold=threshold),
                              warmup=lambda: bk.masked_linear(x, w, None, s, threshold=0.5))  # the op, not the value
    eager = bk.masked_linear(x, w, None, s, threshold=threshold)
    want = x @ (w * (s >= threshold)).t()
    torch.testing.assert_close(eager, want)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, want)


def test_shared_threshold_scalars_are_never_evicted(monkeypatch):
    """Past functional._MAX_SCALARS a new threshold value gets its own tensor; the cached ones stay
    (a captured CUDA graph may read them), and every value is right."""
    from bise_kernels import functional

    monkeypatch.setattr(functional, "_SCALARS", {})
    monkeypatch.setattr(functional, "_MAX_SCALARS", 2)
    cpu = torch.device("cpu")
    first = [functional._device_scalar(v, torch.float32, cpu, True) for v in (0.25, 0.5)]
    extra = functional._device_scalar(0.75, torch.float32, cpu, True)
    assert extra.item() == 0.75 and extra is not functional._device_scalar(0.75, torch.float32, cpu, True)
    again = [functional._device_scalar(v, torch.float32, cpu, True) for v in (0.25, 0.5)]
    assert all(a is b for a, b in zip(again, first))
    assert [t.item() for t in first] == [0.25, 0.5]


@pytest.mark.parametrize("scores_shape", ["weight", "unit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ste_score_gradient_of_frozen_weights_equals_the_reference(scores_shape, dtype):
    """Only the scores train (frozen weights, x and bias): the C++ node's STE shortcut (grad_W_eff * W in
    place) applies to weight-shaped scores of the weight's dtype only; per-unit scores (row sums) and fp32
    scores of fp16/bf16 weights take the fused pass, whose product is rounded once to the scores' dtype
    (in the weights' dtype it lost ~1e-3). (The custom op runs the same C++ backward, so the reference
    backend is the oracle here.)"""
    x, w, b = _t(4, 5, seed=0, dtype=dtype), _t(6, 5, seed=1, dtype=dtype), _t(6, seed=2, dtype=dtype)
    s = _t(6, 5, seed=3) if scores_shape == "weight" else _t(6, seed=3)  # fp32 scores, as a module's
    args = (x, w, b, s, *bk.topk_select(s, 3 if scores_shape == "unit" else 13), "ste", 1.0)
    results = []
    for backend in ("cpp", "torch"):
        with bk.use_backend(backend):
            inputs, leaves = _leaves("linear", args, (False, False, False, True))
            y = _ops.masked_linear(*inputs)
            assert ("bise_autograd" in y.grad_fn.name()) == (backend == "cpp")
            results.append(torch.autograd.grad(y, leaves, _t(*y.shape, seed=4, dtype=dtype))[0])
    got, want = results
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape == s.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("op", ["masked_conv2d", "masked_conv2d_forward", "masked_conv2d_keep_forward"])
@pytest.mark.parametrize("shape", [(0, 2, 3, 3), (4, 0, 3, 3)], ids=["no_out_channels", "no_in_channels"])
def test_an_empty_conv_weight_is_a_named_error(op, shape):
    """A conv weight without elements has nothing to mask: a ValueError naming its shape, as the Python
    check, from the raw ops too (ATen's conv2d raised an unnamed RuntimeError for no output channels and
    returned a (N, 0, OH, OW) output for no input channels)."""
    w = _t(*shape, seed=1)
    x, s = _t(1, shape[1], 5, 5, seed=0), _t(shape[0], seed=2)
    geometry = ([1, 1], [0, 0], [1, 1], 1)
    args = {"masked_conv2d": (x, w, None, s, *_SEL, *geometry, "ste", 1.0),
            "masked_conv2d_forward": (x, w, None, s, *_SEL, *geometry),
            "masked_conv2d_keep_forward": (x, w, None, torch.ones(shape[0], dtype=torch.bool), *geometry)}[op]
    with pytest.raises(ValueError, match=r"weight of shape \[%d, %d, 3, 3\] is empty" % shape[:2]):
        getattr(EXT, op)(*args)
