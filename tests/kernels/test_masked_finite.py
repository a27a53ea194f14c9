"""NaN / inf scores and thresholds of the masked layers in threshold mode: a ValueError naming the
argument on every backend. On the native backends ("cpp" here; "cuda" by a device-side assert) the
check is fused into the mask pass (ext ``masked_weight``) and the API skips its own pass over the
scores (bise_kernels/functional.py::_fused_check); these tests fail if either half is removed."""

from __future__ import annotations

import math
import re

import pytest
import torch

import bise_kernels as bk
from bise_kernels import _checks, backends, functional

BAD = [float("nan"), float("inf"), float("-inf")]
NATIVE = "cpp" in backends.available_backends("cpu")


def _linear(out, inp, structured, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, inp, generator=g).to(dtype)
    w = torch.randn(out, inp, generator=g).to(dtype)
    s = torch.randn(*((out,) if structured else (out, inp)), generator=g).to(dtype)
    return lambda s, **mask: bk.masked_linear(x, w, None, s, **mask), s


def _conv(structured):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 3, 5, 5, generator=g), torch.randn(7, 3, 3, 3, generator=g)
    s = torch.randn(*((7,) if structured else (7, 3, 3, 3)), generator=g)
    return lambda s, **mask: bk.masked_conv2d(x, w, None, s, padding=1, **mask), s


# (layer, positions): first, last, and one in the tail after the vectorised main loop; the
# 300 x 200 weight spans two parallel chunks (csrc/cpu/masked.cpp, kGrain 32768).
CASES = {
    "linear": (lambda: _linear(5, 13, False), [0, 61, 64]),
    "linear_two_chunks": (lambda: _linear(300, 200, False), [0, 40000, 59999]),
    "linear_structured": (lambda: _linear(5, 13, True), [0, 3, 4]),
    "linear_bf16": (lambda: _linear(5, 13, False, torch.bfloat16), [0, 61, 64]),
    "conv": (lambda: _conv(False), [0, 100, 188]),
    "conv_structured": (lambda: _conv(True), [0, 6]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bad", BAD)
def test_non_finite_scores_raise_at_every_position(backend, case, bad):
    make, positions = CASES[case]
    call, scores = make()
    call(scores, threshold=0.1)  # the finite scores pass
    for pos in positions:
        s = scores.clone()
        s.view(-1)[pos] = bad
        with pytest.raises(ValueError, match=f"scores contains non-finite values \\(e.g. {bad}\\)"):
            call(s, threshold=0.1)


@pytest.mark.parametrize("case", ["linear", "conv_structured"])
@pytest.mark.parametrize("bad", BAD)
def test_non_finite_threshold_tensor_raises(backend, case, bad):
    call, scores = CASES[case][0]()
    with pytest.raises(ValueError, match=f"threshold contains non-finite values \\(e.g. {bad}\\)"):
        call(scores, threshold=torch.tensor(bad))


def test_threshold_overflowing_the_scores_dtype_is_named(backend):
    """1e5 is finite as a float but inf in float16: an error on every backend (the native fused check
    would see the inf), for a number and a tensor threshold."""
    call, scores = _linear(5, 13, False, torch.float16)
    assert call(scores, threshold=6e4).shape == (3, 5)
    with pytest.raises(ValueError, match="threshold 100000.0 is not finite in the scores' dtype torch.float16"):
        call(scores, threshold=1e5)
    with pytest.raises(ValueError, match=r"threshold contains non-finite values \(e.g. inf\)"):
        call(scores, threshold=torch.tensor(1e5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_threshold_overflow_is_named_when_no_shared_scalar_is_made(backend, monkeypatch, dtype):
    """Past functional._MAX_SCALARS (and while a CUDA graph is captured, or traced) a threshold gets
    its own scalar: it is checked as a shared one is. The limits are torch's own conversion's:
    the largest float below each still works (float32 past its max raised a RuntimeError)."""
    monkeypatch.setattr(functional, "_SCALARS", {})
    monkeypatch.setattr(functional, "_MAX_SCALARS", 0)
    call, scores = _linear(5, 13, False, dtype)
    limit = functional._OVERFLOW_LIMITS[dtype]
    assert call(scores, threshold=-math.nextafter(limit, 0)).shape == (3, 5)
    for value in (limit, -limit, 1e300):
        message = f"threshold {value!r} is not finite in the scores' dtype {dtype}"
        with pytest.raises(ValueError, match=re.escape(message)):
            call(scores, threshold=value)
    assert functional._SCALARS == {}


def test_threshold_overflow_is_named_under_torch_compile(backend):
    """Traced, a threshold's scalar is made in the graph: the comparison check still runs."""
    call, scores = _linear(5, 13, False, torch.float16)
    try:
        with pytest.raises(Exception, match="threshold 100000.0 is not finite in the scores' dtype torch.float16"):
            torch.compile(lambda s: call(s, threshold=1e5), backend="eager", fullgraph=True)(scores)
    finally:
        torch._dynamo.reset()  # its recompiles of the API would count against later tests' limit


@pytest.mark.parametrize("mask_mode", ["selection", "keep"])
@pytest.mark.parametrize("bad", BAD)
def test_modules_in_threshold_mode_raise(backend, mask_mode, bad):
    for layer, x in ((bk.MaskedLinear(13, 5, threshold=0.0, mask_mode=mask_mode), torch.randn(3, 13)),
                     (bk.MaskedConv2d(3, 4, 3, threshold=0.0, mask_mode=mask_mode), torch.randn(1, 3, 5, 5))):
        layer(x).sum().backward()
        with torch.no_grad():
            layer.scores.view(-1)[-1] = bad
        with pytest.raises(ValueError, match="scores contains non-finite values"):
            layer(x)


@pytest.mark.skipif(not NATIVE, reason="the compiled extension is unavailable")
@pytest.mark.parametrize("op", ["masked_linear", "masked_conv2d"])
def test_native_backend_skips_the_python_pass_and_checks_in_the_kernel(monkeypatch, op):
    """On "cpp" no Python finiteness check runs for a threshold call: the kernel's check raises."""
    monkeypatch.setattr(_checks, "check_finite", lambda t, name: pytest.fail(f"Python check of {name}"))
    call, scores = (_linear(5, 13, False) if op == "masked_linear" else _conv(False))
    with bk.use_backend("cpp"):
        call(scores, threshold=0.1)
        call(scores, threshold=torch.tensor(0.1))
        scores.view(-1)[-1] = float("nan")
        with pytest.raises(ValueError, match=r"scores contains non-finite values \(e.g. nan\)"):
            call(scores, threshold=0.1)
        with pytest.raises(ValueError, match=r"threshold contains non-finite values \(e.g. nan\)"):
            call(scores.nan_to_num(), threshold=torch.tensor(float("nan")))
    with bk.use_backend("torch"), pytest.raises(pytest.fail.Exception, match="Python check of scores"):
        call(scores, threshold=0.1)  # the reference keeps its check


@pytest.mark.skipif(not NATIVE, reason="the compiled extension is unavailable")
def test_masked_weight_checks_every_dtype():
    from bise_kernels._extension import ext_ops

    ext = ext_ops()
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        w, s = torch.randn(4, 33, dtype=dtype), torch.randn(4, 33, dtype=dtype)
        thr, cut = torch.tensor(0.0, dtype=dtype), torch.tensor(2**62)
        ext.masked_weight(w, s, thr, cut)
        for bad in BAD:
            s2 = s.clone()
            s2[3, 32] = bad
            with pytest.raises(ValueError, match=f"scores contains non-finite values \\(e.g. {bad}\\)"):
                ext.masked_weight(w, s2, thr, cut)
            with pytest.raises(ValueError, match=f"threshold contains non-finite values \\(e.g. {bad}\\)"):
                ext.masked_weight(w, s, torch.tensor(bad, dtype=dtype), cut)
            ext.masked_weight(w, s2, thr, cut, False)  # the backward's recompute: no check
        ext.keep_weight(w, s > 0)  # a keep mask has no values to check


class _Passthrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not NATIVE, reason="the compiled extension is unavailable")
def test_the_custom_op_path_checks_in_the_kernel_too():
    """Under a torch-function mode the custom op runs native.py's kernels (not the C++ node)."""
    call, scores = _linear(5, 13, False)
    scores.view(-1)[7] = float("inf")
    with bk.use_backend("cpp"), _Passthrough():
        with pytest.raises(ValueError, match=r"scores contains non-finite values \(e.g. inf\)"):
            call(scores, threshold=0.1)


def test_number_thresholds_launch_no_fill_per_call(monkeypatch):
    """(thr, cut) of a Python-number threshold are made once per (value, dtype, device) and shared."""
    scores = torch.randn(5, 13)
    first = functional.selection(scores, None, 0.25, fused_check=True)
    with monkeypatch.context() as m:
        m.setattr(torch, "full", lambda *a, **k: pytest.fail("a fill per call"))
        again = functional.selection(scores + 1, None, 0.25, fused_check=True)
    assert again[0] is first[0] and again[1] is first[1]
    assert first[0].item() == 0.25 and first[1].item() == functional.KEEP_ALL_TIES
    half = functional.selection(scores.half(), None, 0.25)  # another dtype: its own pair
    assert half[0].dtype == torch.float16 and half[1] is first[1]


def test_shared_thresholds_work_after_inference_mode():
    """A pair first made in inference mode is a normal tensor: a later training call saves it."""
    x, w = torch.randn(3, 13), torch.randn(5, 13, requires_grad=True)
    s = torch.randn(5, 13, requires_grad=True)
    with torch.inference_mode():
        bk.masked_linear(x, w, None, s, threshold=0.123456)
    bk.masked_linear(x, w, None, s, threshold=0.123456).sum().backward()
    assert s.grad is not None


@pytest.mark.parametrize("threshold", [0.0, torch.tensor(0.0)], ids=["number", "tensor"])
def test_keep_mask_follows_the_scores_with_a_shared_threshold(threshold):
    """The (thr, cut) of a number threshold is the same pair for new scores: the module's cached
    keep mask must still follow them."""
    layer = bk.MaskedLinear(13, 5, threshold=threshold, mask_mode="keep")
    first = layer.keep().clone()
    assert torch.equal(first, layer.scores.detach() >= 0)
    with torch.no_grad():
        layer.scores.neg_()
    assert torch.equal(layer.keep(), ~first | (layer.scores.detach() == 0))


# ----------------------------------------------------------------------------- non-finite weights and inputs

def _pruned_inf_cases():
    """(name, layer call of (w, x), weight, scores, x): the first weight (unit) is pruned and holds inf."""
    w, x = torch.tensor([[float("inf"), 1.0], [2.0, 3.0]]), torch.ones(3, 2)
    conv_w, conv_x = w.reshape(2, 2, 1, 1), torch.ones(1, 2, 2, 2)
    return {
        "linear": (lambda w, x, s: bk.masked_linear(x, w, None, s, threshold=0.0), w,
                   torch.tensor([[-1.0, 1], [1, 1]]), x),
        "linear_structured": (lambda w, x, s: bk.masked_linear(x, w, None, s, threshold=0.0), w,
                              torch.tensor([-1.0, 1.0]), x),
        "conv": (lambda w, x, s: bk.masked_conv2d(x, w, None, s, threshold=0.0), conv_w,
                 torch.tensor([[-1.0, 1], [1, 1]]).reshape(2, 2, 1, 1), conv_x),
        "conv_structured": (lambda w, x, s: bk.masked_conv2d(x, w, None, s, threshold=0.0), conv_w,
                            torch.tensor([-1.0, 1.0]), conv_x),
    }


@pytest.mark.parametrize("case", list(_pruned_inf_cases()))
def test_a_pruned_non_finite_weight_gives_nan_as_w_times_keep(backend, case):
    """W_eff = W * keep on every backend, as the reference and torch.nn.utils.prune: a pruned inf weight is
    inf * 0 = NaN in its outputs (Triton selected 0 instead: the output was finite on one backend alone), and an
    inf input makes the pruned weights' gradients NaN (grad_W_eff * keep)."""
    layer, w, s, x = _pruned_inf_cases()[case]
    with bk.use_backend("torch"):
        want = layer(w, x, s)
    got = layer(w, x, s)
    assert want.isnan().any() and not want.isnan().all()
    torch.testing.assert_close(got, want, equal_nan=True)
    finite_w = w.nan_to_num(posinf=4.0).requires_grad_()
    inf_x = x.clone()
    inf_x.view(-1)[0] = float("inf")
    grads = []
    for name in ("torch", backend):
        with bk.use_backend(name):
            finite_w.grad = None
            layer(finite_w, inf_x, s).sum().backward()
            grads.append(finite_w.grad)
    torch.testing.assert_close(grads[1], grads[0], equal_nan=True)


@pytest.mark.parametrize("estimator", ["ste", "sigmoid"])
def test_channel_gate_of_a_one_dimensional_input_has_per_channel_score_gradients(backend, estimator):
    """dim=0 of a 1-d x: the reference summed grad_y * x over every element (sum over no dims is the total),
    a 0-d gradient ("ste": backward failed) or the total in every channel ("sigmoid": silently wrong)."""
    x, s = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -1.0, 0.5]).requires_grad_()
    bk.channel_gate(x, s, dim=0, estimator=estimator).sum().backward()
    slope = torch.sigmoid(s.detach()) * (1 - torch.sigmoid(s.detach())) if estimator == "sigmoid" else 1.0
    torch.testing.assert_close(s.grad, x * slope)


def test_pruned_units_of_an_overflowing_product_are_zero_as_w_times_keep(backend):
    """Per-unit scores, products that overflow fp32 (1e20 * 1e20): a pruned unit's output is x @ (W * 0) = 0, as
    the reference; Triton's output columns multiplied by keep after the K loop made them inf * 0 = NaN."""
    x, w = torch.full((3, 8), 1e20), torch.full((70, 8), 1e20)
    s = torch.cat([torch.full((40,), -1.0), torch.ones(30)])  # units 0..39 pruned
    with bk.use_backend("torch"):
        want = bk.masked_linear(x, w, None, s, threshold=0.0)
    got = bk.masked_linear(x, w, None, s, threshold=0.0)
    assert want[:, :40].eq(0).all() and want[:, 40:].isinf().all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_overflow_limits_are_torchs_own_conversion_limits(dtype):
    """Independent of functional._overflow_limit's bisection: the float just below each limit converts to a
    finite value, the limit itself to inf (or torch refuses it, float32)."""
    limit = functional._OVERFLOW_LIMITS[dtype]
    assert math.isfinite(torch.full((), math.nextafter(limit, 0), dtype=dtype).item())
    try:
        assert math.isinf(torch.full((), limit, dtype=dtype).item())
    except RuntimeError:
        assert dtype == torch.float32
