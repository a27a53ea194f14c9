"""Argument validation: one function per op, shared by the public API and the Python backends.

Every check raises a ValueError / TypeError naming the argument and its value, before any
kernel launch; nothing is silently clamped. The per-op checks (:func:`check_masked_linear`,
:func:`check_masked_conv2d`, :func:`check_channel_gate`) look at types, shapes, dtypes and
devices only, so a backend can run them again at no cost in device time; they check the
selection ``(thr, cut)`` too when given it (backends get it; the API builds it).

The one value check, :func:`check_finite` (NaN / inf scores or thresholds), runs once per API
call and never syncs the host with a GPU: on the CPU one sum (NaN and inf propagate into it, so
a finite sum means every value is finite; only a non-finite one, a bad value or an overflow of
finite ones, is decided by ``torch.aminmax``) and a ValueError; on other devices one
``torch.aminmax`` read (NaN propagates into it) and ``torch._assert_async`` (an asynchronous
device-side assert, reported at the next synchronisation). No n-byte temporary either way.
Under tracing (torch.compile, torch.export, fake or meta tensors) it is skipped, as the values
are not known. Scores that go to a select kernel that makes the check itself, in the pass over
them it makes anyway (registry: ``CHECKS_FINITE``; the "cpp" and "cuda" selects), skip it
(:func:`check_select_finite`): that saves a read of the scores.
A threshold call of masked_linear / masked_conv2d on the native backends skips it
too: their mask pass checks the same values (``functional._fused_check``, docs/masked.md).
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ESTIMATORS = ("ste", "sigmoid")
_INT64_MAX = 2**63 - 1  # the extension computes conv geometry in int64


# ----------------------------------------------------------------------------- numbers


def is_real(value: object) -> bool:
    """A Python or NumPy real number (np.float32, np.int64, ...), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: float) -> bool:
    """math.isfinite, also for a traced SymFloat: dynamo makes a float argument dynamic (dynamic=True, or once
    it changed between compiles), and math.isfinite cannot trace one (a graph break; fullgraph fails)."""
    return value == value and abs(value) != math.inf


def check_real(value: object, name: str) -> float:
    """A finite Python or NumPy real number, not a bool, as a float."""
    if not is_real(value):
        raise TypeError(f"{name} must be a float, got {value!r}")
    if not _finite(float(value)):
        raise ValueError(f"{name} must be finite, got {float(value)!r}")
    return float(value)


def check_int(value: object, name: str) -> int:
    """A Python or NumPy integer (anything with ``__index__``), not a bool, as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return operator.index(value)


def check_dtype(dtype: object, name: str = "dtype") -> None:
    """A module's factory ``dtype``: None or one of :data:`FLOAT_DTYPES` (an integer one failed inside
    nn.Parameter, "Only Tensors of floating point and complex dtype can require gradients"; a complex
    one at the first forward, naming the scores)."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be None or a floating torch.dtype (float32/float16/bfloat16/float64), "
                        f"got {dtype!r}")


def check_density(density: object, name: str = "density") -> float:
    if not is_real(density):
        raise TypeError(f"{name} must be a float in (0, 1], got {density!r}")
    if not (0.0 < float(density) <= 1.0):  # float() in the message too: a traced SymFloat cannot be formatted
        raise ValueError(f"{name} must be in (0, 1] (the fraction of entries kept), got {float(density)!r}")
    return float(density)


def k_from_density(density: object, numel: int) -> int:
    """k = round(density * numel), at least 1: the number of entries kept. ``numel`` may be a 0-dim
    tensor (``Tensor.numel()`` under torch.jit.trace): its value, as the trace's shapes are fixed."""
    numel = int(numel)
    return max(1, min(numel, int(round(check_density(density) * numel))))


def check_k(k: object, numel: int, name: str = "k") -> int:
    k = check_int(k, name)
    if not 1 <= k <= numel:
        raise ValueError(f"{name} must be in [1, {numel}] (numel of the scores), got {k}")
    return k


def check_estimator(estimator: object, temperature: object) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not is_real(temperature):
        raise TypeError(f"temperature must be a positive float, got {temperature!r}")
    if not (float(temperature) > 0 and _finite(float(temperature))):  # float(): a SymFloat cannot be formatted
        raise ValueError(f"temperature must be a positive finite float, got {float(temperature)!r}")


def check_mask_spec(density: object, threshold: object) -> None:
    """Exactly one of ``density`` (top-k) and ``threshold`` (``scores >= threshold``)."""
    if (density is None) == (threshold is None):
        raise ValueError(
            f"give exactly one of density (top-k) or threshold (scores >= threshold); "
            f"got density={density!r}, threshold={threshold!r}"
        )
    if density is not None:
        check_density(density)
    elif isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold must be a number or a one-element tensor, got shape "
                             f"{tuple(threshold.shape)}")
        check_real_dtype(threshold, "threshold")
    elif not is_real(threshold):
        raise TypeError(f"threshold must be a float or a one-element tensor, got {threshold!r}")
    elif not _finite(threshold):
        raise ValueError(f"threshold must be finite, got {float(threshold)!r}")


# ----------------------------------------------------------------------------- tensors


def check_real_dtype(t: torch.Tensor, name: str) -> None:
    """A tensor holding a real number (a threshold, a hint): not bool (``True`` as a number is a
    TypeError too) nor complex (the cast would drop the imaginary part with only a warning)."""
    if t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name} must be a real (floating or integer) tensor, got {t.dtype}")


def check_scalar_device(t: torch.Tensor, name: str, device: torch.device) -> None:
    """A one-element tensor to be used with tensors on ``device``: there or on the CPU (a CPU scalar
    goes with any device's tensors, as in torch's own ops)."""
    if t.device != device and t.device.type != "cpu":
        where = "the CPU" if device.type == "cpu" else f"{device} or the CPU"
        raise ValueError(f"{name} is on {t.device}, the scores on {device}: give it on {where}")


def check_tensor(t: object, name: str) -> torch.Tensor:
    """A tensor of one of the floating dtypes every backend supports."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), got {t.dtype}")
    if t.layout is not torch.strided or t.is_nested:
        raise dense_layout_error(t, name)
    return t


def dense_layout_error(t: torch.Tensor, name: str) -> TypeError:
    """The error for a nested or sparse ``t``: a nested one failed inside torch ("NestedTensorImpl doesn't
    support sizes. Please file an issue") or in the op's dispatch, without naming the argument."""
    if t.is_nested:
        return TypeError(f"{name} must be a dense (strided) tensor, got a nested tensor; pad it "
                         "(Tensor.to_padded_tensor) or call the layer per sequence")
    return TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; Tensor.to_dense() makes one")


def check_like(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str, dtype: bool = True,
               why: str = "") -> None:
    """``t`` on ``ref``'s device and (if ``dtype``) of its dtype; ``why`` ends the message."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; both must share a device{why}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}{why}")


def check_finite(t: torch.Tensor, name: str) -> None:
    """NaN / inf in ``t``: ValueError on the CPU, a device-side assert elsewhere (see module doc)."""
    if torch.compiler.is_compiling() or t.device.type == "meta" or _is_fake(t) or t.numel() == 0:
        return
    if t.device.type == "cpu":
        # A sum is one vectorised read: 3 us for 64 K fp32 values on one thread where aminmax takes
        # 15 us (benchmarks/bench_masked_overhead.py's 256x256 layer; docs/masked.md).
        if math.isfinite(t.sum().item()):
            return
        lo, hi = (v.item() for v in torch.aminmax(t))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = lo if not math.isfinite(lo) else hi
            raise ValueError(f"{name} contains non-finite values (e.g. {bad}); NaN and inf are not allowed")
    else:
        torch._assert_async(torch.isfinite(torch.stack(torch.aminmax(t))).all(),
                            f"{name} contains non-finite values (NaN or inf)")


def check_selection_finite(scores: torch.Tensor, thr: torch.Tensor) -> None:
    """:func:`check_finite` of a threshold selection, threshold first (as the native kernels'
    fused check): the Python keep_mask kernels' ``check_finite``."""
    check_finite(thr, "threshold")
    check_finite(scores, "scores")


def _is_fake(t: torch.Tensor) -> bool:
    return type(t).__name__ in ("FakeTensor", "FunctionalTensor")


def check_scores(scores: object, name: str = "scores", finite: bool = True) -> torch.Tensor:
    """Non-empty floating scores without NaN / inf (the one value check of a call; ``finite=False``
    leaves it to the op's kernel, functional.selection)."""
    check_tensor(scores, name)
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(scores.shape)}); top-k needs at least one score")
    if finite:
        check_finite(scores, name)
    return scores


def check_score_list(tensors: object, name: str = "scores", finite: bool = True) -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{name} is an empty list")
    for i, t in enumerate(tensors):
        check_scores(t, f"{name}[{i}]", finite)
    first = tensors[0]
    for i, t in enumerate(tensors[1:], start=1):
        check_like(t, first, f"{name}[{i}]", f"{name}[0]")
    return list(tensors)


def check_select(tensors: object, ks: Sequence[object], batched: bool = False) -> None:
    """A select kernel's arguments, as the native kernels check them in C++ (csrc/checks.h): for the Python
    kernels (reference, Triton), whose raw ops (torch.ops.bise_kernels.*) are called without the API's
    checks too (a k past the scores gave (nan, INT64_MIN) on Triton). NaN / inf are the API's (a pass)."""
    tensors = check_score_list(tensors, finite=False)
    if batched:
        if len(ks) != len(tensors):
            raise ValueError(f"ks has {len(ks)} entries for {len(tensors)} scores tensors")
        for i, (t, k) in enumerate(zip(tensors, ks)):
            check_k(k, t.numel(), f"ks[{i}]")
    else:
        check_k(ks[0], sum(t.numel() for t in tensors))


def check_select_finite(tensors: Sequence[torch.Tensor], names: Sequence[str], kernel: str) -> None:
    """:func:`check_finite` of each of a selection's scores, unless the ``kernel`` that will select
    them (``"topk_select"``, ``"batched_topk_select"``, ``"topk_keep_mask"``) raises on NaN / inf
    itself. Nothing while compiling: :func:`check_finite` skips traced values, and the registry is not
    traceable (a backend not loaded yet imports its modules: a fullgraph compile as a process's first
    call failed)."""
    from . import backends

    if torch.compiler.is_compiling():
        return
    first = tensors[0]
    if backends.checks_finite(kernel, first.device.type, first.dtype):
        return
    for t, name in zip(tensors, names):
        check_finite(t, name)


def check_dim(dim: object, ndim: int) -> int:
    dim = check_int(dim, "dim")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim must be in [{-ndim}, {ndim - 1}] for a {ndim}-d input, got {dim}")
    return dim % ndim


def check_pair(value: object, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return operator.index(pair[0]), operator.index(pair[1])


# ----------------------------------------------------------------------------- per op


def check_selection(scores: torch.Tensor, thr: object, cut: object) -> None:
    """``thr``: one value of the scores' dtype; ``cut``: one int64; both on the scores' device."""
    check_tensor(scores, "scores")
    if not isinstance(thr, torch.Tensor) or thr.numel() != 1 or thr.dtype != scores.dtype:
        raise TypeError(f"thr must be a one-element tensor of the scores' dtype {scores.dtype}, got "
                        f"{_describe(thr)}")
    if not isinstance(cut, torch.Tensor) or cut.numel() != 1 or cut.dtype != torch.int64:
        raise TypeError(f"cut must be a one-element int64 tensor, got {_describe(cut)}")
    check_like(thr, scores, "thr", "scores")
    check_like(cut, scores, "cut", "scores", dtype=False)


def _describe(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _check_weight_shaped(t: torch.Tensor, weight: torch.Tensor, name: str) -> bool:
    """``t`` (scores or a keep mask) of weight's shape or one per output unit; returns the latter."""
    if weight.dim() == 0 or (t.shape != weight.shape and tuple(t.shape) != (weight.shape[0],)):
        expected = f"{tuple(weight.shape)} or ({weight.shape[0]},)" if weight.dim() else "(not a 0-d weight)"
        raise ValueError(f"{name} must have weight's shape {expected}, got {tuple(t.shape)}")
    return t.shape != weight.shape


def _check_operands(x: object, weight: object, bias: object) -> None:
    check_tensor(x, "x")
    check_tensor(weight, "weight")
    check_like(weight, x, "weight", "x")
    if bias is not None:
        check_tensor(bias, "bias")
        check_like(bias, x, "bias", "x")
        if weight.dim() == 0 or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0] if weight.dim() else '?'},), "
                             f"got {tuple(bias.shape)}")


def _check_layer(x: object, weight: object, bias: object, scores: object, thr: object, cut: object) -> bool:
    """What the masked layers share; returns whether the scores are structured (one per unit)."""
    _check_operands(x, weight, bias)
    check_tensor(scores, "scores")
    check_like(scores, x, "scores", "x", dtype=False)
    structured = _check_weight_shaped(scores, weight, "scores")
    if thr is not None or cut is not None:
        check_selection(scores, thr, cut)
    return structured


def _check_linear_shapes(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match weight of shape {tuple(weight.shape)}")


def check_masked_linear(x: object, weight: object, bias: object, scores: object,
                        thr: object = None, cut: object = None) -> bool:
    """Arguments of masked_linear (and of the selection when given); returns ``structured``."""
    structured = _check_layer(x, weight, bias, scores, thr, cut)
    _check_linear_shapes(x, weight)
    return structured


def check_keep(keep: object, weight: torch.Tensor) -> bool:
    """A packed keep mask: bool, of weight's shape or (out,), on weight's device; returns ``structured``."""
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"keep must be a bool tensor (a keep mask), got {_describe(keep)}")
    check_like(keep, weight, "keep", "weight", dtype=False)
    return _check_weight_shaped(keep, weight, "keep")


def check_keep_op_scores(scores: object, weight: object, keep: object) -> None:
    """A keep op's scores, weight-shaped or one per unit, checked before its keep mask: a module makes
    the mask from its scores, so a mask of the wrong shape means scores of the wrong shape (as the
    extension's keep ops check). Then the mask (:func:`check_keep`), of the scores' shape: the forward
    kernels read only the mask, and a per-unit mask beside weight-shaped scores (or the reverse) failed
    only in the backward on "cpp" / "triton"."""
    check_tensor(scores, "scores")
    check_tensor(weight, "weight")
    _check_weight_shaped(scores, weight, "scores")
    check_keep(keep, weight)
    if scores.shape != keep.shape:
        raise ValueError(f"scores must have keep's shape {tuple(keep.shape)}, got {tuple(scores.shape)}")


def check_masked_linear_keep(x: object, weight: object, bias: object, keep: object,
                             scores: object = None) -> bool:
    """Arguments of masked_linear_keep (scores, when given, of keep's shape); returns ``structured``."""
    _check_operands(x, weight, bias)
    _check_linear_shapes(x, weight)
    structured = check_keep(keep, weight)
    if scores is not None:
        check_tensor(scores, "scores")
        check_like(scores, x, "scores", "x", dtype=False)
        if scores.shape != keep.shape:
            raise ValueError(f"scores must have keep's shape {tuple(keep.shape)}, got {tuple(scores.shape)}")
    return structured


def conv2d_output_shape(x_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """(N, out_channels, OH, OW) of a zero-padded conv2d (the one copy of this formula)."""
    size = [(x_shape[2 + i] + 2 * padding[i] - dilation[i] * (weight_shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    return (x_shape[0], weight_shape[0], size[0], size[1])


def check_masked_conv2d(x: object, weight: object, bias: object, scores: object, thr: object, cut: object,
                        stride: object, padding: object, dilation: object, groups: object
                        ) -> tuple[bool, tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Arguments of masked_conv2d; returns ``(structured, stride, padding, dilation)`` as int pairs.

    ``thr`` and ``cut`` may be None (the API checks before it selects).
    """
    structured = _check_layer(x, weight, bias, scores, thr, cut)
    return (structured, *_check_conv_geometry(x, weight, stride, padding, dilation, groups))


def check_masked_conv2d_keep(x: object, weight: object, bias: object, keep: object, stride: object, padding: object,
                             dilation: object, groups: object) -> tuple[bool, tuple[int, int], tuple[int, int],
                                                                        tuple[int, int]]:
    """Arguments of masked_conv2d_keep's forward; returns as :func:`check_masked_conv2d`."""
    _check_operands(x, weight, bias)
    structured = check_keep(keep, weight)
    return (structured, *_check_conv_geometry(x, weight, stride, padding, dilation, groups))


def _check_conv_geometry(x: torch.Tensor, weight: torch.Tensor, stride: object, padding: object, dilation: object,
                         groups: object) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """x, weight, stride, padding, dilation and groups of a zero-padded conv2d; the int pairs."""
    pairs = tuple(check_pair(v, n) for v, n in ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    for (a, b), name, low in zip(pairs, ("stride", "padding", "dilation"), (1, 0, 1)):
        if a < low or b < low:
            raise ValueError(f"{name} must be >= {low}, got {(a, b)}")
        if max(a, b) > _INT64_MAX:
            raise ValueError(f"{name} must fit int64, got {(a, b)}")
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"x and weight must be 4-d (N,C,H,W) and (O,C/groups,kH,kW), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.numel() == 0:  # per-unit scores of in_channels 0 passed the forward and failed in the backward
        raise ValueError(f"weight of shape {tuple(weight.shape)} is empty: a masked conv2d has no weight to mask")
    groups_ok = isinstance(groups, numbers.Integral) and not isinstance(groups, bool) and groups >= 1
    if not groups_ok or x.shape[1] != weight.shape[1] * groups or weight.shape[0] % groups:
        raise ValueError(f"groups={groups!r} does not fit x channels {x.shape[1]} and weight {tuple(weight.shape)}")
    for i in range(2):  # as the extension's check, whose int64 arithmetic must not overflow
        if x.shape[2 + i] + 2 * pairs[1][i] > _INT64_MAX or pairs[2][i] * (weight.shape[2 + i] - 1) + 1 > _INT64_MAX:
            raise ValueError(f"padding {pairs[1]} or dilation {pairs[2]} too large: the padded input or the "
                             f"kernel's span overflows int64")
    out = conv2d_output_shape(x.shape, weight.shape, *pairs)
    if out[2] < 1 or out[3] < 1:
        raise ValueError(f"kernel {tuple(weight.shape[2:])} (dilation {pairs[2]}) is larger than the padded input "
                         f"{tuple(x.shape[2:])} + 2 * padding {pairs[1]}")
    return pairs


def check_channel_gate(x: object, scores: object, thr: object, cut: object, dim: object) -> int:
    """Arguments of channel_gate (``thr``/``cut`` may be None); returns ``dim`` in [0, x.dim())."""
    check_tensor(x, "x")
    check_tensor(scores, "scores")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the gated one)")
    dim = check_dim(dim, x.dim())
    if tuple(scores.shape) != (x.shape[dim],):
        raise ValueError(f"scores must have shape ({x.shape[dim]},) (x.shape[{dim}]), got {tuple(scores.shape)}")
    check_like(scores, x, "scores", "x", dtype=False)
    if thr is not None or cut is not None:
        check_selection(scores, thr, cut)
    return dim
