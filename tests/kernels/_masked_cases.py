"""The masked-layer and channel-gate cases every backend runs (tests/kernels/test_masked_kernels.py).

Each ``check_*`` runs one backend's kernels (an object exposing the reference.py names) on
``device`` and compares every output and gradient with the reference backend.
Scores are fp32 on a coarse grid with ties cut by a finite ``cut``; shapes are odd.
"""

from __future__ import annotations

import torch

from bise_kernels.backends import reference as R

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ESTIMATORS = [("ste", 1.0), ("sigmoid", 0.7)]
ALL_NEEDS = [True, True, True, True]
CONV_CASES = [  # stride, padding, dilation, groups
    ((1, 1), (0, 0), (1, 1), 1),
    ((2, 2), (1, 1), (1, 1), 1),
    ((2, 1), (1, 2), (2, 1), 1),
    ((1, 1), (1, 1), (1, 1), 3),
]
GATE_LAYOUTS = {  # name -> (shape, dim, memory format or "transposed"); inner >= / < 16 and 32 differ
    "nchw": ((3, 5, 6, 7), 1, None),
    "channels_last": ((3, 5, 6, 7), 1, torch.channels_last),
    "large_inner": ((2, 3, 40), 1, None),
    "last_dim": ((4, 3, 13), 2, None),
    "first_dim": ((13, 2, 3), 0, None),
    "small_inner": ((17, 13, 3), 1, None),
    "2d": ((37, 11), 1, None),
    "strided": ((7, 5, 6), 1, "transposed"),
}


def tol(dtype, score_grad=False):
    """Score gradients sum weight-gradient terms (per unit, with cancellation): the reference does it in fp32."""
    if dtype == torch.float64:
        return dict(rtol=2e-6, atol=1e-5) if score_grad else dict(rtol=1e-12, atol=1e-12)
    if dtype == torch.float32 and score_grad:
        return dict(rtol=1e-5, atol=1e-5)
    return {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=1e-2, atol=1e-2),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}[dtype]


def assert_grads(got, want, dtype):
    """Same None pattern, dtypes and shapes; values close (the last gradient is the score gradient)."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None, f"gradient {i} should not be computed"
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, f"gradient {i}: {g.dtype}{tuple(g.shape)}"
        torch.testing.assert_close(g, w, **tol(dtype, score_grad=i == len(want) - 1), msg=f"gradient {i}")


def randn(*shape, dtype=torch.float32, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def tied_scores(shape, dtype=torch.float32, seed=0, device="cpu"):
    """Scores on a coarse grid (many exact ties) and a top-k whose threshold cuts through a tie group."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randint(-4, 5, shape, generator=g) / 4).to(dtype)
    flat = scores.view(-1)
    flat[1] = flat[-1] = 0  # at least two ties at zero
    k = int((flat > 0).sum()) + int((flat == 0).sum()) // 2  # half of the zeros are kept
    thr, cut = R.topk_select([scores], k)
    assert float(thr) == 0.0 and int(cut) < scores.numel()
    return scores.to(device), thr.to(device), cut.to(device)


def check_linear(k, device, dtype, structured, estimator, temperature, needs=ALL_NEEDS):
    x, w, b = (randn(*s, dtype=dtype, seed=i, device=device) for i, s in enumerate([(2, 3, 37), (29, 37), (29,)]))
    scores, thr, cut = tied_scores((29,) if structured else (29, 37), seed=4, device=device)
    torch.testing.assert_close(k.masked_linear_forward(x, w, b, scores, thr, cut),
                               R.masked_linear_forward(x, w, b, scores, thr, cut), **tol(dtype))
    args = (randn(2, 3, 29, dtype=dtype, seed=5, device=device), x, w, scores, thr, cut, estimator, temperature,
            list(needs))
    assert_grads(k.masked_linear_backward(*args), R.masked_linear_backward(*args), dtype)


def check_conv(k, device, dtype, conv_case, structured, channels_last, needs=ALL_NEEDS):
    stride, padding, dilation, groups = conv_case
    x = randn(2, 6, 9, 11, dtype=dtype, seed=1, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w, b = randn(9, 6 // groups, 3, 2, dtype=dtype, seed=2, device=device), randn(9, dtype=dtype, seed=3, device=device)
    scores, thr, cut = tied_scores((9,) if structured else w.shape, seed=4, device=device)
    conv = (list(stride), list(padding), list(dilation), groups)
    want = R.masked_conv2d_forward(x, w, b, scores, thr, cut, *conv)
    torch.testing.assert_close(k.masked_conv2d_forward(x, w, b, scores, thr, cut, *conv), want, **tol(dtype))
    args = (randn(*want.shape, dtype=dtype, seed=5, device=device), x, w, scores, thr, cut, *conv, "sigmoid", 0.5,
            list(needs))
    assert_grads(k.masked_conv2d_backward(*args), R.masked_conv2d_backward(*args), dtype)


def gate_input(layout, dtype, device):
    shape, dim, fmt = GATE_LAYOUTS[layout]
    if fmt == "transposed":
        return randn(*reversed(shape), dtype=dtype, seed=1, device=device).transpose(0, 2), dim
    x = randn(*shape, dtype=dtype, seed=1, device=device)
    return (x if fmt is None else x.to(memory_format=fmt)), dim


def check_gate(k, device, layout, dtype, estimator, temperature):
    x, dim = gate_input(layout, dtype, device)
    scores, thr, cut = tied_scores((x.shape[dim],), seed=2, device=device)
    y = k.channel_gate_forward(x, scores, thr, cut, dim)
    torch.testing.assert_close(y, R.channel_gate_forward(x, scores, thr, cut, dim), rtol=0, atol=0)
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    gy = randn(*x.shape, dtype=dtype, seed=3, device=device)  # contiguous even where x is channels_last
    for needs in ([True, True], [True, False], [False, True]):
        args = (gy, x, scores, thr, cut, dim, estimator, temperature, needs)
        assert_grads(k.channel_gate_backward(*args), R.channel_gate_backward(*args), dtype)


def assert_keep_trains_like_selection(layers, x, backend, steps=3):
    """Train a (selection, keep) pair of layers with equal state side by side: same outputs and grads.

    The scores change between steps, so the keep mode's cached mask must follow them.
    """
    for _ in range(steps):
        out = []
        for layer in layers:
            y = layer(x)
            y.square().sum().backward()
            out.append((y, layer.weight.grad, layer.bias.grad, layer.scores.grad))
            with torch.no_grad():
                layer.scores -= 0.5 * layer.scores.grad
            layer.zero_grad()
        for g, e in zip(out[1], out[0]):
            torch.testing.assert_close(g, e, **({} if backend == "triton" else dict(rtol=0, atol=0)))


def assert_compiles_and_exports(layer, x, op):
    """torch.compile (fullgraph) and torch.export of ``layer`` call ``op`` and give eager's results."""
    want = layer(x)
    want_grad = torch.autograd.grad(want.sum(), layer.scores)[0]
    torch._dynamo.reset()  # earlier tests' compiles of the same module code count against the recompile limit
    y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(y.sum(), layer.scores)[0], want_grad, rtol=0, atol=0)
    program = torch.export.export(layer, (x,))
    assert f"bise_kernels.{op}.default" in {str(n.target) for n in program.graph.nodes}
    torch.testing.assert_close(program.module()(x), want, rtol=0, atol=0)
