"""The NaN / inf check of the masked modules and the channel gate in threshold mode: made once per
scores update, in Python only where the op that consumes the selection does not make it in its own
pass (the native masked_weight of MaskedLinear / MaskedConv2d in "selection" mask mode, the native
keep_mask with check_finite in "keep" mode, the native gate forward), and never skipped: a NaN
score or threshold raises a ValueError naming it on every CPU backend, in every mode."""

from __future__ import annotations

import pytest
import torch

import bise_kernels as bk
from bise_kernels import _checks, _ops, backends


def _layers(threshold, mask_mode):
    return [(bk.MaskedLinear(13, 5, threshold=threshold, mask_mode=mask_mode), torch.randn(3, 13)),
            (bk.MaskedConv2d(3, 4, 3, threshold=threshold, mask_mode=mask_mode), torch.randn(1, 3, 5, 5))]


def _op_checks_itself(layer, x):
    """Whether the op the layer calls now makes the finiteness check in the pass reading the scores."""
    if isinstance(layer, bk.ChannelGate):
        return x.numel() > 0 and _ops._native_layer_op("channel_gate", x) is not None
    if layer.mask_mode == "keep":
        return backends.checks_finite("keep_mask", "cpu", torch.float32)
    name = "masked_linear" if isinstance(layer, bk.MaskedLinear) else "masked_conv2d"
    return layer.mask_mode == "selection" and _ops._native_layer_op(name, x) is not None


@pytest.mark.parametrize("mask_mode", ["selection", "keep"])
@pytest.mark.parametrize("threshold", [0.0, torch.tensor(0.0)], ids=["number", "tensor"])
def test_module_checks_in_python_only_where_its_op_does_not(backend, monkeypatch, mask_mode, threshold):
    checked = []
    check = _checks.check_finite
    monkeypatch.setattr(_checks, "check_finite", lambda t, name: (checked.append(name), check(t, name)))
    gate = [(bk.ChannelGate(4, threshold=threshold), torch.randn(2, 4, 3))] if mask_mode == "selection" else []
    for layer, x in _layers(threshold, mask_mode) + gate:
        if backend == "cpp":  # the case this test is about
            assert _op_checks_itself(layer, x)
        expected = [] if _op_checks_itself(layer, x) else ["scores", "threshold"][:1 + isinstance(threshold, torch.Tensor)]
        for _ in range(2):
            with torch.no_grad():
                layer.scores.add_(0.01)  # a new version of the scores: a new selection
            checked.clear()
            layer(x).sum().backward()
            layer(x)  # the cached selection: no second check
            assert checked == expected


@pytest.mark.parametrize("mask_mode", ["selection", "keep"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_threshold_of_a_module_raises(backend, mask_mode, bad):
    for layer, x in _layers(torch.tensor(bad), mask_mode):
        with pytest.raises(ValueError, match=f"threshold contains non-finite values \\(e.g. {bad}\\)"):
            layer(x)


def test_a_selection_left_unchecked_is_checked_before_the_keep_mask_reads_it():
    """On "cpp" the selection mode leaves the check to masked_weight; switching the same layer and
    scores to "keep" (keep_mask does not check) must make it, not drop the NaN score."""
    with bk.use_backend("cpp"):
        layer, x = _layers(0.0, "selection")[0]
        with torch.no_grad():
            layer.scores.view(-1)[4] = float("nan")
        with pytest.raises(ValueError, match=r"scores contains non-finite values \(e.g. nan\)"):
            layer(x)  # the kernel's check; the selection stays cached, unchecked
        layer.mask_mode = "keep"
        with pytest.raises(ValueError, match=r"scores contains non-finite values \(e.g. nan\)"):
            layer(x)
        with pytest.raises(ValueError, match=r"scores contains non-finite values \(e.g. nan\)"):
            layer.mask()


@pytest.mark.parametrize("threshold", [0.0, torch.tensor(0.0)], ids=["number", "tensor"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_of_a_keep_module_raise(backend, threshold, bad):
    """"keep" mask mode: a bad score raises on every backend (the native keep_mask in its pass, the
    others in Python), through the forward and mask(), again after a call that failed (nothing
    cached), and after the scores are repaired the layer runs."""
    for layer, x in _layers(threshold, "keep"):
        layer(x)
        with torch.no_grad():
            layer.scores.view(-1)[7] = bad
        for call in (lambda: layer(x), layer.mask, lambda: layer(x)):
            with pytest.raises(ValueError, match=f"scores contains non-finite values \\(e.g. {bad}\\)"):
                call()
        with torch.no_grad():
            layer.scores.view(-1)[7] = 0.5
        assert layer.mask().view(-1)[7] and torch.equal(layer.keep(), layer.mask())
        layer(x).sum().backward()


def test_keep_mode_leaves_the_check_to_keep_mask_where_it_checks(monkeypatch):
    """On "cpp" a "keep" layer's threshold selection is checked by keep_mask (check_finite=True,
    once per scores update), not in Python; on "torch" in Python, and keep_mask is not asked."""
    calls = []
    keep_mask = _ops.keep_mask
    monkeypatch.setattr(_ops, "keep_mask", lambda *args: calls.append(args[4:]) or keep_mask(*args))
    for name, asked in (("cpp", (True,)), ("torch", (False,))):
        if name not in bk.available_backends("cpu"):
            continue
        with bk.use_backend(name):
            layer, x = _layers(torch.tensor(0.0), "keep")[0]
            calls.clear()
            layer(x)
            layer(x)
            with torch.no_grad():
                layer.scores.add_(0.01)
            layer(x)
            assert calls == [asked, asked], name


@pytest.mark.parametrize("threshold", [0.0, torch.tensor(0.0)], ids=["number", "tensor"])
@pytest.mark.parametrize("shape", [(2, 4, 3), (0, 4, 3)], ids=["x", "empty_x"])
def test_channel_gate_checks_its_scores(backend, threshold, shape):
    """The gate module and the API raise on every backend (the native forward in its pass, except for
    an empty x, which launches nothing: there the API checks)."""
    gate = bk.ChannelGate(4, threshold=threshold)
    x = torch.randn(*shape)
    gate(x).sum().backward()
    with torch.no_grad():
        gate.scores[2] = float("nan")
    for call in (gate, lambda x: bk.channel_gate(x, gate.scores, threshold=threshold)):
        with pytest.raises(ValueError, match=r"scores contains non-finite values \(e.g. nan\)"):
            call(x)
    with pytest.raises(ValueError, match=r"threshold contains non-finite values \(e.g. inf\)"):
        bk.ChannelGate(4, threshold=torch.tensor(float("inf")))(x)


@pytest.mark.skipif("cpp" not in bk.available_backends("cpu"), reason="the compiled extension is unavailable")
def test_native_gate_forward_checks_every_dtype_and_the_backward_does_not():
    from bise_kernels._extension import ext_ops

    ext = ext_ops()
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x, s = torch.randn(2, 5, 3, dtype=dtype), torch.randn(5, dtype=dtype)
        thr, cut = torch.tensor(0.0, dtype=dtype), torch.tensor(2**62)
        ext.channel_gate_forward(x, s, thr, cut, 1)
        for bad in (float("nan"), float("inf"), float("-inf")):
            for channel in (0, 4):
                s2 = s.clone()
                s2[channel] = bad
                with pytest.raises(ValueError, match=f"scores contains non-finite values \\(e.g. {bad}\\)"):
                    ext.channel_gate_forward(x, s2, thr, cut, 1)
                ext.channel_gate_backward(x, x, s2, thr, cut, 1, "ste", 1.0, True, True)  # the forward checked
            with pytest.raises(ValueError, match=f"threshold contains non-finite values \\(e.g. {bad}\\)"):
                ext.channel_gate_forward(x, s, torch.tensor(bad, dtype=dtype), cut, 1)


@pytest.mark.parametrize("threshold", [0.0, torch.tensor(0.0)], ids=["number", "tensor"])
def test_threshold_layers_compile_with_fullgraph(backend, threshold):
    """The fused-check decision looks the native op up in the registry, which dynamo cannot trace:
    while compiling it is skipped (the custom op's kernels check), for the modules and the API."""
    layer = bk.MaskedLinear(8, 5, threshold=threshold)
    x = torch.randn(3, 8)
    torch.testing.assert_close(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x), rtol=0, atol=0)
    w, s = torch.randn(2, 3, 1, 1), torch.randn(2, 3, 1, 1)
    call = lambda x: bk.masked_conv2d(x, w, None, s, threshold=threshold)
    xc = torch.randn(1, 3, 4, 4)
    torch.testing.assert_close(torch.compile(call, backend="aot_eager", fullgraph=True)(xc), call(xc), rtol=0, atol=0)


def test_layers_with_other_float_thresholds_compile_with_fullgraph(backend):
    """Once a float threshold changed between compiles, dynamo traces it as a SymFloat, which
    math.isfinite cannot take: the threshold check of _checks.check_mask_spec must trace anyway
    (it failed on the second threshold before), for the modules (both mask modes), the gate and
    the API; and a non-finite threshold is still a ValueError (when not fullgraph)."""
    torch._dynamo.reset()
    x, xg, w, s = torch.randn(3, 8), torch.randn(2, 6, 4), torch.randn(5, 8), torch.randn(5, 8)
    for t in (0.0, 0.5, 0.25):
        for layer, inp in ((bk.MaskedLinear(8, 5, threshold=t), x), (bk.ChannelGate(6, threshold=t), xg),
                           (bk.MaskedLinear(8, 5, threshold=t, mask_mode="keep"), x)):
            compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(inp), layer(inp), rtol=0, atol=0)
        call = lambda x: bk.masked_linear(x, w, None, s, threshold=t)  # noqa: B023 (called at once)
        torch.testing.assert_close(torch.compile(call, backend="aot_eager", fullgraph=True)(x), call(x),
                                   rtol=0, atol=0)
    for t in (float("nan"), float("-inf")):
        with pytest.raises(ValueError, match=f"threshold must be finite, got {t}"):
            torch.compile(lambda x: bk.masked_linear(x, w, None, s, threshold=t), backend="aot_eager")(x)  # noqa: B023


def test_the_functional_api_compiles_with_dynamic_floats(backend):
    """dynamic=True makes float arguments SymFloats, the default temperature=1.0 too: math.isfinite in its check
    could not trace one (fullgraph failed, 'torch.* op returned non-Tensor ... isfinite'; else a graph break per
    call), for masked_linear, masked_conv2d and channel_gate; a non-finite temperature is still a ValueError."""
    torch._dynamo.reset()
    x, w, s = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6, 8)
    xc, wc, sc = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    xg, sg = torch.randn(2, 6, 3), torch.randn(6)
    calls = [(lambda x: bk.masked_linear(x, w, None, s, density=0.5), x),
             (lambda x: bk.masked_linear(x, w, None, s, threshold=0.0, temperature=0.5), x),
             (lambda x: bk.masked_conv2d(x, wc, None, sc, density=0.5, padding=1), xc),
             (lambda x: bk.channel_gate(x, sg, density=0.5), xg)]
    for call, inp in calls:
        compiled = torch.compile(call, backend="aot_eager", fullgraph=True, dynamic=True)
        torch.testing.assert_close(compiled(inp), call(inp), rtol=0, atol=0)
    with pytest.raises(ValueError, match="temperature must be a positive finite float, got nan"):
        torch.compile(lambda x: bk.masked_linear(x, w, None, s, density=0.5, temperature=float("nan")),
                      backend="aot_eager", dynamic=True)(x)


@pytest.mark.parametrize("threshold", [0.0, torch.tensor(0.0)], ids=["number", "tensor"])
def test_a_compiled_keep_layer_checks_at_run_time(backend, threshold):
    """While compiling there is no cache and no registry: a threshold layer in "keep" mode traces
    keep_mask with check_finite, so the compiled layer's kernel raises on a NaN score (before, the
    Python check was skipped under tracing and nothing checked)."""
    layer, x = bk.MaskedLinear(8, 5, threshold=threshold, mask_mode="keep"), torch.randn(3, 8)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    with torch.no_grad():
        layer.scores[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"scores contains non-finite values \(e.g. nan\)"):
        compiled(x)
