"""Bad input: named ValueError / TypeError before any kernel runs, nothing silently clamped."""

import re
import warnings

import numpy as np
import pytest
import torch

import bise_kernels as bk
from bise_kernels import _checks


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval_is_rejected(density):
    with pytest.raises(ValueError, match="density"):
        bk.topk_mask(torch.randn(5), density)


def test_density_of_wrong_type_is_rejected():
    with pytest.raises(TypeError, match="density"):
        bk.topk_mask(torch.randn(5), "0.5")


@pytest.mark.parametrize("k", [0, 6, -1])
def test_k_outside_range_is_rejected(k):
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        bk.topk_threshold(torch.randn(5), k)


OPS = torch.ops.bise_kernels


def test_k_outside_range_is_rejected_on_every_backend(backend):
    """The API's check and each select kernel's own, called raw (torch.ops.bise_kernels.*): a k past the
    scores gave (nan, INT64_MIN) on Triton, and a short ks list fewer results than scores."""
    a, b = torch.randn(5), torch.randn(3)
    calls = [
        (lambda: bk.topk_threshold(a, 6), r"k must be in \[1, 5\]"),
        (lambda: bk.topk_select([a, b], 9), r"k must be in \[1, 8\]"),
        (lambda: OPS.topk_select([a], 6, None), r"k must be in \[1, 5\]"),
        (lambda: OPS.topk_select([a, b], 9, None), r"k must be in \[1, 8\]"),
        (lambda: OPS.topk_keep_mask([a, b], 9, None), r"k must be in \[1, 8\]"),
        (lambda: OPS.batched_topk_select([a, b], [5, 4], None), r"ks\[1\] must be in \[1, 3\]"),
        (lambda: OPS.batched_topk_select([a, b], [1], None), "ks has 1 entries for 2"),
        (lambda: OPS.batched_topk_select([a, b], [1, 1, 1], None), "ks has 3 entries for 2"),
    ]
    for call, match in calls:
        with pytest.raises(ValueError, match=match):
            call()
    assert OPS.batched_topk_select([a, b], [5, 3], None)[0].shape == (2,)  # the largest valid ks


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_rejected(bad):
    scores = torch.randn(6)
    scores[3] = bad
    with pytest.raises(ValueError, match="non-finite"):
        bk.topk_mask(scores, 0.5)
    with pytest.raises(ValueError, match="non-finite"):
        bk.masked_linear(torch.randn(2, 3), torch.randn(2, 3), None, scores.reshape(2, 3), density=0.5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_rejected_on_every_backend(backend, bad):
    """Where the select kernel checks finiteness itself ("cpp") and where the API does (the others)."""
    scores = torch.randn(6)
    scores[5] = bad
    calls = [
        lambda: bk.topk_threshold(scores, 2),
        lambda: bk.topk_select([torch.randn(3), scores], 2),
        lambda: bk.global_topk_masks([torch.randn(3), scores], 0.5),
        lambda: bk.layerwise_topk_masks([torch.randn(3), scores], 0.5),
        lambda: bk.channel_gate(torch.randn(2, 6), scores, density=0.5),
        lambda: bk.channel_gate(torch.randn(2, 6), scores, threshold=0.0),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=f"contains non-finite values \\(e.g. {bad}\\)"):
            call()


def test_the_api_skips_its_finiteness_read_where_the_select_kernel_checks(monkeypatch):
    """No finiteness read of the scores before a "cpp" selection (its pass checks them) or a "cpp"
    threshold gate (its forward checks them); one before a "torch" selection and threshold gate."""
    if "cpp" not in bk.available_backends("cpu"):
        pytest.skip("cpp backend unavailable")
    from bise_kernels import _checks

    calls = []
    real = _checks.check_finite
    monkeypatch.setattr(_checks, "check_finite", lambda t, name: calls.append(t.numel()) or real(t, name))
    scores, x = torch.randn(6), torch.randn(2, 6)
    with bk.use_backend("cpp"):
        bk.topk_mask(scores, 0.5)
        bk.layerwise_topk_masks([scores, scores], 0.5)
        bk.channel_gate(x, scores, density=0.5)
        assert calls == []
        bk.channel_gate(x, scores, threshold=0.0)
        assert calls == []
    with bk.use_backend("torch"):
        bk.topk_mask(scores, 0.5)
        bk.channel_gate(x, scores, threshold=0.0)
        assert calls == [6, 6]


def test_a_composed_topk_keep_mask_relies_on_its_select_checking(monkeypatch):
    """A backend with a checking topk_select but no topk_keep_mask: _ops composes that select with
    keep_mask, and the API leaves the finiteness check to the select (registry COMPOSED_OF)."""
    import sys
    import types

    from bise_kernels import backends

    if "cpp" not in bk.available_backends("cpu"):
        pytest.skip("cpp backend unavailable")
    module = types.ModuleType("checking_select")
    module.topk_select, module.KERNELS = backends.kernel_table("cpp")["topk_select"], ("topk_select",)
    module.CHECKS_FINITE = ("topk_select",)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(backends.BACKENDS, "checking", backends.Backend("checking", ("cpu",), (module.__name__,)))
    from bise_kernels import _checks

    monkeypatch.setattr(_checks, "check_finite", lambda t, name: pytest.fail("the API read the scores for NaN / inf"))
    scores = torch.randn(6)
    with bk.use_backend("checking"):
        assert backends.checks_finite("topk_keep_mask", "cpu", torch.float32)
        assert torch.equal(bk.topk_mask(scores, 0.5), scores > scores.median())  # the lower median: 3 kept
        scores[2] = float("nan")
        with pytest.raises(ValueError, match="scores contains non-finite values"):
            bk.topk_mask(scores, 0.5)


def test_the_cached_checks_finite_follows_the_backend_and_the_registry(monkeypatch):
    """checks_finite is cached per (backend now, kernel, device type, dtype): its answer follows
    use_backend / set_backend and writes to the registry tables, and a NaN raises on each backend
    (a stale True would let the reference select NaN scores unchecked)."""
    from bise_kernels import backends

    if "cpp" not in bk.available_backends("cpu"):
        pytest.skip("cpp backend unavailable")
    monkeypatch.setattr(backends, "_default", backends.get_backend())  # set_backend below: restored after
    scores = torch.randn(64)
    scores[5] = float("nan")

    def check(answer):
        for kernel in ("topk_select", "topk_keep_mask"):
            assert backends.checks_finite(kernel, "cpu", torch.float32) is answer, kernel
        with pytest.raises(ValueError, match="scores contains non-finite values"):
            bk.topk_select(scores, 10)
        with pytest.raises(ValueError, match="scores contains non-finite values"):
            bk.topk_mask(scores, 0.5)

    for name, answer in (("cpp", True), ("torch", False), ("cpp", True), ("auto", True), ("torch", False)):
        with bk.use_backend(name):
            check(answer)
        bk.set_backend(name)
        check(answer)
    bk.set_backend("auto")
    check(True)
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("torch",))  # "auto" on the CPU now takes the reference
    check(False)
    monkeypatch.undo()
    with bk.use_backend("auto"):
        check(True)


def test_empty_and_integer_scores_are_rejected_on_every_backend(backend):
    """The API's own checks (_checks.check_scores), not only the C++ kernels': on the torch backend an empty
    tensor was "k must be in [1, 0]", and one in a global list was selected over silently."""
    with pytest.raises(ValueError, match="scores is empty"):
        bk.topk_mask(torch.empty(0), 0.5)
    with pytest.raises(ValueError, match=r"scores\[1\] is empty"):
        bk.global_topk_masks([torch.randn(2), torch.empty(0)], 0.5)
    with pytest.raises(TypeError, match="floating"):
        bk.topk_mask(torch.arange(5), 0.5)


def test_list_modes_reject_mixed_dtypes_and_non_lists_on_every_backend(backend):
    """The API's own check (_checks.check_score_list), not only the C++ kernels': the torch backend
    concatenated mixed dtypes (promoting them) and the Triton select read float64 bits as float32."""
    mixed = [torch.randn(3), torch.randn(3, dtype=torch.float64)]
    for call in (lambda: bk.global_topk_masks(mixed, 0.5), lambda: bk.layerwise_topk_masks(mixed, 0.5),
                 lambda: bk.topk_select(mixed, 2)):
        with pytest.raises(TypeError, match=r"scores\[1\] has dtype"):
            call()
    with pytest.raises(TypeError, match="list"):
        bk.global_topk_masks(torch.randn(3), 0.5)
    with pytest.raises(ValueError, match="empty"):
        bk.global_topk_masks([], 0.5)


def test_scores_shape_must_match_weight_or_output_units():
    with pytest.raises(ValueError, match=r"scores must have weight's shape \(4, 3\) or \(4,\)"):
        bk.masked_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(3), density=0.5)


def _selection(scores):
    """A valid (thr, cut) for a raw layer op: scores >= 0, every tie kept."""
    return torch.zeros((), dtype=scores.dtype), torch.tensor(2**62)


def test_scores_and_bias_shapes_are_named_on_every_backend(backend):
    """Scores must be weight-shaped or (out,) exactly, bias (out,) exactly, on every backend (the torch and
    triton kernels rely on the Python checks): scores of shape (1, out) of a square weight masked its
    input columns, and a (1,) bias broadcast, silently. Through the API and the raw ops."""
    x, w, s = torch.randn(2, 4), torch.randn(4, 4), torch.randn(4)
    xc, wc, sc = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(3)
    thr, cut = _selection(s)
    geometry = ([1, 1], [0, 0], [1, 1], 1)  # stride, padding, dilation, groups
    calls, scores = [], r"scores must have weight's shape"
    for bad in (s.reshape(1, -1), s.reshape(-1, 1)):
        calls += [(lambda bad=bad: bk.masked_linear(x, w, None, bad, threshold=0.0), scores),
                  (lambda bad=bad: bk.masked_linear(x, w, None, bad, density=0.5), scores),
                  (lambda bad=bad: OPS.masked_linear(x, w, None, bad, thr, cut, "ste", 1.0), scores),
                  (lambda bad=bad: OPS.masked_linear_keep(x, w, None, bad, bad >= 0, "ste", 1.0), scores)]
    for bad in (sc.reshape(1, -1), sc.reshape(-1, 1, 1, 1)):
        calls += [(lambda bad=bad: bk.masked_conv2d(xc, wc, None, bad, threshold=0.0), scores),
                  (lambda bad=bad: OPS.masked_conv2d(xc, wc, None, bad, thr, cut, *geometry, "ste", 1.0), scores),
                  (lambda bad=bad: OPS.masked_conv2d_keep(xc, wc, None, bad, bad >= 0, *geometry, "ste", 1.0),
                   scores)]
    for n in (1, 5):
        b = torch.randn(n)
        calls += [(lambda b=b: bk.masked_linear(x, w, b, s, threshold=0.0), r"bias must have shape \(4,\)"),
                  (lambda b=b: OPS.masked_linear_keep(x, w, b, s, s >= 0, "ste", 1.0), r"bias must have shape \(4,\)"),
                  (lambda b=b: OPS.masked_linear(x, w, b, s, thr, cut, "ste", 1.0), r"bias must have shape \(4,\)")]
    for n in (1, 4):
        b = torch.randn(n)
        calls += [(lambda b=b: bk.masked_conv2d(xc, wc, b, sc, threshold=0.0), r"bias must have shape \(3,\)"),
                  (lambda b=b: OPS.masked_conv2d(xc, wc, b, sc, thr, cut, *geometry, "ste", 1.0),
                   r"bias must have shape \(3,\)"),
                  (lambda b=b: OPS.masked_conv2d_keep(xc, wc, b, sc, sc >= 0, *geometry, "ste", 1.0),
                   r"bias must have shape \(3,\)")]
    for call, match in calls:
        with pytest.raises(ValueError, match=match):
            call()
    # the shapes that are allowed, to the same ops
    assert OPS.masked_linear(x, w, torch.randn(4), s, thr, cut, "ste", 1.0).shape == (2, 4)
    assert OPS.masked_conv2d(xc, wc, torch.randn(3), sc, thr, cut, *geometry, "ste", 1.0).shape == (1, 3, 3, 3)


def test_exactly_one_of_density_and_threshold():
    x, w, s = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="exactly one"):
        bk.masked_linear(x, w, None, s)
    with pytest.raises(ValueError, match="exactly one"):
        bk.masked_linear(x, w, None, s, density=0.5, threshold=0.0)


def test_mismatched_dtypes_and_shapes_are_named():
    x, w, s = torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3)
    with pytest.raises(TypeError, match="weight has dtype"):
        bk.masked_linear(x, w, None, s, density=0.5)
    with pytest.raises(ValueError, match="bias must have shape"):
        bk.masked_linear(x, w.float(), torch.randn(3), s, density=0.5)
    with pytest.raises(ValueError, match="does not match weight"):
        bk.masked_linear(torch.randn(2, 5), w.float(), None, s, density=0.5)


def test_bad_estimator_and_temperature():
    x, w, s = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="estimator"):
        bk.masked_linear(x, w, None, s, density=0.5, estimator="gumbel")
    with pytest.raises(ValueError, match="temperature"):
        bk.masked_linear(x, w, None, s, density=0.5, estimator="sigmoid", temperature=0.0)


def test_conv_arguments_are_checked(backend):
    """On every backend: the Python checks the torch and triton kernels rely on, not torch's unnamed errors."""
    x, w = torch.randn(1, 4, 5, 5), torch.randn(6, 2, 3, 3)
    with pytest.raises(ValueError, match="groups=3"):
        bk.masked_conv2d(x, w, None, torch.randn(6), threshold=0.0, groups=3)
    w5 = torch.randn(5, 2, 3, 3)  # x's 4 channels fit 2 groups of 2, its 5 output channels do not
    with pytest.raises(ValueError, match=r"groups=2 does not fit x channels 4 and weight \(5, 2, 3, 3\)"):
        bk.masked_conv2d(x, w5, None, torch.randn(5), threshold=0.0, groups=2)
    thr, cut = torch.tensor(0.0), torch.tensor(2**62)
    with pytest.raises(ValueError, match="groups=2 does not fit x channels 4"):
        OPS.masked_conv2d(x, w5, None, torch.randn(5), thr, cut, [1, 1], [0, 0], [1, 1], 2, "ste", 1.0)
    with pytest.raises(ValueError, match="groups=2 does not fit x channels 4"):
        OPS.masked_conv2d_keep(x, w5, None, torch.randn(5), torch.ones(5, dtype=torch.bool), [1, 1], [0, 0],
                               [1, 1], 2, "ste", 1.0)
    with pytest.raises(TypeError, match="stride"):
        bk.masked_conv2d(x, w, None, torch.randn(6), threshold=0.0, stride=(1, 2, 3), groups=2)


@pytest.mark.parametrize("conv, match", [
    ({"stride": 0}, r"stride must be >= 1, got \(0, 0\)"),
    ({"stride": (1, 0)}, r"stride must be >= 1, got \(1, 0\)"),
    ({"padding": -1}, r"padding must be >= 0, got \(-1, -1\)"),
    ({"dilation": 0}, r"dilation must be >= 1"),
    ({"dilation": 3}, r"kernel \(3, 3\) \(dilation \(3, 3\)\) is larger than the padded input"),
    ({"padding": 2**62}, r"padding \(4611686018427387904, 4611686018427387904\) or dilation \(1, 1\) too large"),
    ({"dilation": (1, 2**62)}, "the padded input or the kernel's span overflows int64"),
    ({"stride": 2**63}, r"stride must fit int64, got \(9223372036854775808, 9223372036854775808\)"),
])
def test_conv_geometry_is_checked(backend, conv, match):
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match=match):
        bk.masked_conv2d(x, w, None, torch.randn(3), threshold=0.0, **conv)


def test_conv_kernel_larger_than_input_is_named(backend):
    """An output size of exactly 0 (2 + 0 - 3 + 1): torch's conv2d raises an unnamed RuntimeError. Only the
    width too small (output (3, 0)) too: the check covers each spatial dim, not only the height."""
    x, w = torch.randn(1, 2, 2, 2), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="larger than the padded input"):
        bk.masked_conv2d(x, w, None, torch.randn(3), threshold=0.0)
    with pytest.raises(ValueError, match="larger than the padded input"):
        bk.masked_conv2d(torch.randn(1, 2, 5, 2), w, None, torch.randn(3), threshold=0.0)
    with pytest.raises(ValueError, match="larger than the padded input"):
        bk.masked_conv2d(x, w, None, torch.randn(3, 2, 3, 3), density=0.5, stride=2, dilation=(1, 1))
    with pytest.raises(ValueError, match="larger than the padded input"):
        OPS.masked_conv2d(x, w, None, torch.randn(3), torch.tensor(0.0), torch.tensor(2**62), [1, 1], [0, 0],
                          [1, 1], 1, "ste", 1.0)
    with pytest.raises(ValueError, match="larger than the padded input"):
        OPS.masked_conv2d_keep(x, w, None, torch.randn(3), torch.ones(3, dtype=torch.bool), [1, 1], [0, 0],
                               [1, 1], 1, "ste", 1.0)
    assert bk.masked_conv2d(x, w, None, torch.randn(3), threshold=0.0, padding=1).shape == (1, 3, 2, 2)


def _layer_call(op, **mask):
    """Call a masked op on small valid tensors with the given mask arguments."""
    if op == "masked_linear":
        return bk.masked_linear(torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(4, 3), **mask)
    if op == "masked_conv2d":
        return bk.masked_conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3), None, torch.randn(3), **mask)
    return bk.channel_gate(torch.randn(2, 3, 4), torch.randn(3), **mask)


@pytest.mark.parametrize("op", ["masked_linear", "masked_conv2d", "channel_gate"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_threshold_tensor_is_a_named_error(op, bad):
    with pytest.raises(ValueError, match="threshold contains non-finite values"):
        _layer_call(op, threshold=torch.tensor(bad))


@pytest.mark.parametrize("op", ["masked_linear", "masked_conv2d", "channel_gate"])
def test_numpy_scalars_are_accepted_as_density_and_threshold(op):
    torch.manual_seed(0)
    expected = _layer_call(op, density=0.5)
    torch.manual_seed(0)
    assert torch.equal(_layer_call(op, density=np.float32(0.5)), expected)
    torch.manual_seed(0)
    expected = _layer_call(op, threshold=0.25)
    torch.manual_seed(0)
    assert torch.equal(_layer_call(op, threshold=np.float64(0.25)), expected)


def test_numpy_scalars_are_accepted_as_k_and_density_of_the_selection():
    scores = torch.randn(10)
    assert torch.equal(bk.topk_threshold(scores, np.int64(3)), bk.topk_threshold(scores, 3))
    assert torch.equal(bk.topk_mask(scores, np.float32(0.3)), bk.topk_mask(scores, 0.3))
    assert all(torch.equal(a, b) for a, b in zip(bk.layerwise_topk_masks([scores, scores], np.float16(0.5)),
                                                 bk.layerwise_topk_masks([scores, scores], 0.5)))


def test_bools_and_strings_are_not_numbers():
    with pytest.raises(TypeError, match="k must be an int"):
        bk.topk_threshold(torch.randn(5), True)
    with pytest.raises(TypeError, match="k must be an int"):
        bk.topk_threshold(torch.randn(5), 2.0)
    with pytest.raises(TypeError, match="threshold must be a float"):
        _layer_call("masked_linear", threshold="0.5")


def test_meta_tensors_select_without_reading_values():
    scores = torch.randn(10, device="meta")
    mask = bk.topk_mask(scores, 0.5)
    assert mask.device.type == "meta" and mask.shape == (10,) and mask.dtype == torch.bool
    assert bk.topk_threshold(scores, 3).shape == ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_finiteness_check_catches_every_non_finite_value_in_every_dtype(dtype, bad):
    scores = torch.randn(1000, dtype=dtype)
    scores[617] = bad
    with pytest.raises(ValueError, match=f"scores contains non-finite values \\(e.g. {bad}\\)"):
        _checks.check_finite(scores, "scores")
    _checks.check_finite(scores[:617], "scores")  # the finite rest passes


def test_finiteness_check_is_skipped_for_fake_and_meta_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _checks.check_finite(torch.full((4,), float("nan"), device="meta"), "scores")
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.full((4,), float("nan")))
        _checks.check_finite(fake, "scores")


def test_finiteness_check_reads_once_without_a_temporary(monkeypatch):
    """CPU: one sum (no isfinite over all n entries); aminmax decides only when the sum is not finite:
    a bad value, or finite values whose sum overflows (which pass)."""
    calls = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: calls.append(t.numel()) or real(t))
    monkeypatch.setattr(torch, "isfinite", lambda t: pytest.fail("isfinite over the scores"))
    _checks.check_finite(torch.randn(1000), "scores")
    assert calls == []
    for dtype, big in ((torch.float32, 3e38), (torch.float16, 6e4), (torch.bfloat16, 3e38), (torch.float64, 1e308)):
        _checks.check_finite(torch.full((7,), big, dtype=dtype), "scores")  # the sum overflows, the values are finite
        assert calls == [7], dtype
        calls.clear()
    with pytest.raises(ValueError, match=r"scores contains non-finite values \(e.g. -inf\)"):
        _checks.check_finite(torch.tensor([1.0, float("-inf"), 2.0]), "scores")
    assert calls == [3]


def test_backend_checks_name_a_bad_selection():
    x, w, s = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 3)
    cut = torch.tensor(5)
    with pytest.raises(TypeError, match="thr must be a one-element tensor of the scores' dtype torch.float32"):
        _checks.check_masked_linear(x, w, None, s, torch.tensor(0.0, dtype=torch.float64), cut)
    with pytest.raises(TypeError, match="cut must be a one-element int64 tensor"):
        _checks.check_masked_linear(x, w, None, s, torch.tensor(0.0), torch.tensor(5.0))
    with pytest.raises(ValueError, match="thr is on meta but scores is on cpu"):
        _checks.check_selection(s, torch.tensor(0.0, device="meta"), cut)
    assert _checks.check_masked_linear(x, w, None, s[:, 0], torch.tensor(0.0), cut) is True
    assert _checks.check_channel_gate(torch.randn(2, 3, 4), s[0], torch.tensor(0.0), cut, -2) == 1


def test_conv_output_shape_matches_torch():
    x, w = torch.randn(2, 4, 9, 7), torch.randn(6, 2, 3, 2)
    for stride, padding, dilation in [((1, 1), (0, 0), (1, 1)), ((2, 3), (1, 2), (2, 1))]:
        y = torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, 2)
        assert _checks.conv2d_output_shape(x.shape, w.shape, stride, padding, dilation) == tuple(y.shape)


def test_channel_gate_arguments_are_checked():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"scores must have shape \(3,\)"):
        bk.channel_gate(x, torch.randn(4))
    with pytest.raises(ValueError, match="dim must be in"):
        bk.channel_gate(x, torch.randn(3), dim=3)
    with pytest.raises(ValueError, match="num_channels"):
        bk.ChannelGate(0)


def test_channel_gate_scores_shape_is_named_on_every_backend(backend):
    """(1, C), (C, 1) or (C + 1,) scores, through the API (threshold and density) and the raw op: the torch
    and triton kernels broadcast a (1, C) gate silently without the Python check."""
    x = torch.randn(2, 3, 4)
    thr, cut = _selection(x)
    for bad in (torch.randn(1, 3), torch.randn(3, 1), torch.randn(4)):
        for call in (lambda: bk.channel_gate(x, bad, threshold=0.0), lambda: bk.channel_gate(x, bad, density=0.5),
                     lambda: OPS.channel_gate(x, bad, thr, cut, 1, "ste", 1.0)):
            with pytest.raises(ValueError, match=r"scores must have shape \(3,\) \(x.shape\[1\]\)"):
                call()


def test_hint_must_be_a_single_value():
    with pytest.raises(TypeError, match="hint"):
        bk.topk_mask(torch.randn(5), 0.5, hint=torch.randn(2))


@pytest.mark.parametrize("bad", [torch.tensor(True), torch.tensor(0.5 + 1j)], ids=["bool", "complex"])
def test_threshold_and_hint_tensors_hold_real_numbers(bad):
    """A bool or complex tensor was cast without a word (True as a Python number is a TypeError; the
    imaginary part was dropped with a warning); an int tensor is a number and stays accepted."""
    for op in ("masked_linear", "masked_conv2d", "channel_gate"):
        with pytest.raises(TypeError, match=f"threshold must be a real .* got {bad.dtype}"):
            _layer_call(op, threshold=bad)
    with pytest.raises(TypeError, match=f"hint must be a real .* got {bad.dtype}"):
        bk.topk_threshold(torch.randn(5), 2, hint=bad)
    scores = torch.randn(5)
    assert torch.equal(bk.channel_gate(torch.ones(2, 5), scores, threshold=torch.tensor(0)),
                       bk.channel_gate(torch.ones(2, 5), scores, threshold=0.0))


def test_threshold_and_hint_on_another_device_are_named():
    """A threshold or hint must be on the scores' device or the CPU (a meta one failed inside the copy,
    "Cannot copy out of meta tensor"); a CPU one goes with any device's scores."""
    meta = torch.tensor(0.0, device="meta")
    with pytest.raises(ValueError, match="threshold is on meta, the scores on cpu"):
        _layer_call("channel_gate", threshold=meta)
    with pytest.raises(ValueError, match="hint is on meta, the scores on cpu"):
        bk.topk_mask(torch.randn(5), 0.5, hint=meta)


def test_selection_entry_points_name_a_scores_argument_of_the_wrong_kind():
    """A list given where one tensor is taken (topk_mask / topk_threshold; global_topk_masks takes
    the list) failed with AttributeError 'list' object has no attribute 'numel'."""
    t = torch.randn(5)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor, got list"):
        bk.topk_mask([t], 0.5)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor, got ndarray"):
        bk.topk_threshold(np.zeros(5, dtype=np.float32), 1)
    assert torch.equal(bk.topk_select([t], 2)[0], bk.topk_select(t, 2)[0])  # topk_select takes either
    for bad in (None, "ab"):
        with pytest.raises(TypeError, match=f"density must be a number or a list of numbers .* got {bad!r}"):
            bk.layerwise_topk_masks([t, t], bad)
    assert len(bk.layerwise_topk_masks([t, t], np.array([0.5, 0.2]))) == 2


def test_modules_name_a_bad_input_before_they_select():
    """The modules' selection (and keep mask) were computed, then the op named the input; now a
    non-tensor, a 0-d one or one of the wrong feature count is named first, and nothing is cached."""
    for module, x, match in ((bk.MaskedLinear(8, 6, density=0.5, mask_mode="keep"), torch.randn(5, 7),
                              r"x of shape \(5, 7\) does not match weight"),
                             (bk.MaskedLinear(8, 6, density=0.5), torch.tensor(1.0), "does not match weight"),
                             (bk.MaskedConv2d(3, 4, 3, density=0.5), torch.randn(1, 2, 5, 5), "x channels 2"),
                             (bk.MaskedConv2d(3, 4, 3, density=0.5), torch.randn(5, 5), "must be 4-d")):
        with pytest.raises(ValueError, match=match):
            module(x)
        assert module._cache is None and module._keep_cache is None
    for module in (bk.MaskedLinear(8, 6, density=0.5), bk.MaskedConv2d(3, 4, 3, density=0.5),
                   bk.ChannelGate(4, density=0.5)):
        with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
            module([1.0, 2.0])
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        bk.ChannelGate(4, dim=0, density=0.5)(torch.tensor(1.0))
    for call in (lambda m: bk.mask_model(m, density=0.5), bk.unmask_model):
        with pytest.raises(TypeError, match="model must be an nn.Module, got NoneType"):
            call(None)


def _nested(*shape, layout=torch.strided):
    """A nested tensor of two entries of ``shape`` (the first dimension 1 and 2 long: ragged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are in prototype stage"
        return torch.nested.nested_tensor([torch.randn(1, *shape[1:]), torch.randn(2, *shape[1:])], layout=layout)


@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_nested_input_to_a_functional_layer_is_named(backend, layout):
    scores = torch.randn(4, 8)
    for call in (lambda x: bk.masked_linear(x, torch.randn(4, 8), None, scores, density=0.5),
                 lambda x: bk.channel_gate(x, torch.randn(8), density=0.5, dim=-1)):
        with pytest.raises(TypeError, match="x must be a dense .strided. tensor, got a nested"):
            call(_nested(2, 8, layout=layout))


_BAD_MODULE_INPUTS = {  # a module, a bad input, what the error says (the Python and the C++ checks alike)
    "features": (lambda: bk.MaskedLinear(8, 4, density=0.5), torch.randn(2, 7), r"x of shape .2, 7. does not match"),
    "int-x": (lambda: bk.MaskedLinear(8, 4, density=0.5), torch.ones(2, 8, dtype=torch.long), "x must be"),
    "dtype": (lambda: bk.MaskedLinear(8, 4, threshold=0.0), torch.randn(2, 8, dtype=torch.float64),
              "weight has dtype .* but x has"),
    "conv-5d": (lambda: bk.MaskedConv2d(3, 4, 3, density=0.5), torch.randn(1, 1, 3, 5, 5), "must be 4-d"),
    "conv-channels": (lambda: bk.MaskedConv2d(3, 4, 3, density=0.5), torch.randn(1, 2, 5, 5), "groups=1"),
    "gate-int-x": (lambda: bk.ChannelGate(4), torch.ones(2, 4, dtype=torch.long), "x must be"),
    # nested and sparse input: a nested one failed inside torch ("NestedTensorImpl doesn't support sizes.
    # Please file an issue") or in the op's dispatch (NotImplementedError), naming nothing
    "nested": (lambda: bk.MaskedLinear(8, 4, density=0.5), _nested(2, 8), "dense .strided. tensor, got a nested"),
    "nested-jagged": (lambda: bk.MaskedLinear(8, 4, density=0.5), _nested(2, 8, layout=torch.jagged),
                      "dense .strided. tensor, got a nested"),
    "conv-nested": (lambda: bk.MaskedConv2d(3, 4, 3, density=0.5), _nested(3, 5, 5), "dense .strided. tensor"),
    "gate-nested": (lambda: bk.ChannelGate(8), _nested(2, 8, layout=torch.jagged), "dense .strided. tensor"),
    "sparse": (lambda: bk.MaskedLinear(8, 4, density=0.5), torch.randn(2, 8).to_sparse(), "dense .strided. tensor"),
}


@pytest.mark.parametrize("case, mask_mode", [(case, mode) for case in _BAD_MODULE_INPUTS
                                             for mode in (("auto",) if "gate" in case else ("selection", "keep"))])
def test_a_module_rejects_a_bad_input_on_every_backend(backend, case, mask_mode):
    """A module's forward leaves its argument checks to the kernels; the reference ones made none, so
    on "torch" a ChannelGate took integer input, a MaskedConv2d a 5-d one (rejected by the others),
    and the rest failed in torch's own ops."""
    make, x, message = _BAD_MODULE_INPUTS[case]
    module = make()
    if mask_mode != "auto":
        module.mask_mode = mask_mode
    with pytest.raises((ValueError, TypeError), match=message) as got:
        module(x)
    with bk.use_backend("torch"), pytest.raises((ValueError, TypeError)) as want:
        module(x)
    assert got.type is want.type, "the native checks raise another error class than the Python ones"


@pytest.mark.parametrize("make, message", [
    (lambda: bk.ChannelGate(4, init="zeros"), "init must be a float, got 'zeros'"),
    (lambda: bk.ChannelGate(4, init=float("nan")), "init must be finite, got nan"),
    (lambda: bk.MaskedLinear(4, 3, density=0.5, score_init=float("inf")), "score_init must be finite, got inf"),
    (lambda: bk.MaskedLinear(4, 3, density=0.5, score_init=True), "score_init must be .*, got True"),
], ids=["gate-str", "gate-nan", "linear-inf", "linear-bool"])
def test_initial_scores_are_checked_at_construction(make, message):
    """A constant initial score names its argument when built (a gate's string init failed in float(),
    a NaN or inf one only at the first call, as "scores contains non-finite values")."""
    with pytest.raises((TypeError, ValueError), match=message):
        make()


def test_numpy_initial_scores_are_accepted():
    assert torch.equal(bk.ChannelGate(3, init=np.float32(0.5)).scores, torch.full((3,), 0.5))
    assert torch.equal(bk.MaskedLinear(2, 2, density=0.5, score_init=np.float32(0.5)).scores, torch.full((2, 2), 0.5))


def test_a_gate_with_both_density_and_threshold_is_an_error():
    """As for the masked layers: exactly one rule. A gate given both dropped the threshold silently;
    without either it is the BISE gate (threshold 0.0), with density alone a top-k."""
    x, scores = torch.randn(2, 4), torch.tensor([0.3, -0.1, 0.2, 0.0])
    for threshold in (0.5, 0.0):
        with pytest.raises(ValueError, match="exactly one"):
            bk.channel_gate(x, scores, density=0.5, threshold=threshold)
        with pytest.raises(ValueError, match="exactly one"):
            bk.ChannelGate(4, density=0.5, threshold=threshold)
    assert torch.equal(bk.channel_gate(x, scores), x * torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert torch.equal(bk.channel_gate(x, scores, density=0.5), x * torch.tensor([1.0, 0.0, 1.0, 0.0]))
    gate = bk.ChannelGate(4)
    assert gate.threshold == 0.0 and gate.density is None
    gate = bk.ChannelGate(4, density=0.5)
    assert gate.threshold is None and gate.density == 0.5


@pytest.mark.parametrize("attribute, value, message", [("temperature", 0.0, "temperature must be a positive"),
                                                       ("temperature", -1.0, "temperature must be a positive"),
                                                       ("estimator", "gumbel", "estimator must be")])
def test_an_estimator_set_on_a_module_is_checked_on_every_backend(backend, attribute, value, message):
    """A temperature annealed to 0 (or an estimator mistyped) after construction: "cpp" and "triton"
    refused it, the reference backward computed NaN (or the sigmoid slope) silently. The forward refuses
    it too, in eval mode without autograd as well: it did on "cpp" / "cuda" only (their native forward
    checks every argument; the Python kernels read the estimator in their backward)."""
    for module, x in ((bk.MaskedLinear(4, 3, density=0.5, estimator="sigmoid"), torch.randn(2, 4)),
                      (bk.MaskedLinear(4, 3, density=0.5, mask_mode="keep"), torch.randn(2, 4)),
                      (bk.MaskedConv2d(2, 3, 1, threshold=0.0, estimator="sigmoid"), torch.randn(1, 2, 3, 3)),
                      (bk.MaskedConv2d(2, 3, 1, density=0.5, mask_mode="keep"), torch.randn(1, 2, 3, 3)),
                      (bk.ChannelGate(4), torch.randn(2, 4))):
        setattr(module, attribute, value)
        with pytest.raises(ValueError, match=message):
            module(x).sum().backward()
        with torch.no_grad(), pytest.raises(ValueError, match=message):
            module.eval()(x)


def test_gate_construction_arguments_are_checked():
    """num_channels as any integer (a NumPy one was refused as "must be a positive int, got 4"); dim an int
    when built (a string was taken, then refused at the first call)."""
    assert bk.ChannelGate(np.int64(4)).num_channels == 4
    with pytest.raises(TypeError, match="dim must be an int, got '1'"):
        bk.ChannelGate(4, dim="1")
    with pytest.raises(ValueError, match="num_channels must be a positive int, got 0"):
        bk.ChannelGate(0)
    with pytest.raises(TypeError, match="num_channels must be an int, got True"):
        bk.ChannelGate(True)


def test_layerwise_density_list_must_match_the_tensors():
    """One density per tensor: a shorter or longer list is an error naming both counts (zip would
    silently drop tensors)."""
    scores = [torch.randn(4), torch.randn(5), torch.randn(6)]
    for densities in ([0.5, 0.5], [0.5] * 4):
        with pytest.raises(ValueError, match=f"density has {len(densities)} entries but scores has 3 tensors"):
            bk.layerwise_topk_masks(scores, densities)


def test_a_bad_density_or_threshold_is_named_in_a_fullgraph_compile():
    """Once dynamo has made a density or threshold dynamic (it changed between calls), the message
    formatted the SymFloat and failed ("BUILD_STRING type error"), hiding the ValueError."""
    torch._dynamo.reset()
    x, w, s = torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 4)
    for spec, bad, match in (("density", 1.5, r"density must be in \(0, 1\] .*got 1\.5"),
                             ("threshold", float("inf"), "threshold must be finite, got inf")):
        layer = torch.compile(lambda x, v: bk.masked_linear(x, w, None, s, **{spec: v}), backend="aot_eager",
                              fullgraph=True)
        layer(x, 0.5)
        layer(x, 0.25)
        with pytest.raises(Exception) as info:
            layer(x, bad)
        assert re.search(match, f"{info.value} {info.value.__cause__!r}"), info.value


def test_keep_mode_names_scores_of_the_wrong_shape(backend):
    """A module in keep mode makes its keep mask from its scores; scores of the wrong shape were named
    as "keep must have weight's shape". The scores are named now, on every backend."""
    for module, x in ((bk.MaskedLinear(8, 6, density=0.5, mask_mode="keep"), torch.randn(2, 8)),
                      (bk.MaskedConv2d(3, 4, 3, density=0.5, mask_mode="keep"), torch.randn(1, 3, 5, 5))):
        module.scores = torch.nn.Parameter(torch.randn(5))
        with pytest.raises(ValueError, match=r"scores must have weight's shape .* got \(?\[?5,?\]?\)?"):
            module(x)
