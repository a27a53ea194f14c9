"""The public functional API: validate arguments, resolve the mask selection, call the ops."""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _checks, _ops
from .backends.reference import KEEP_ALL_TIES

Number = Union[float, int]


# ----------------------------------------------------------------------------- selection


def topk_threshold(scores: Tensor, k: int, *, hint: Optional[Tensor] = None) -> Tensor:
    """The k-th largest value of ``scores`` as a 0-dim tensor on its device (no host sync).

    ``hint``: a previous threshold (e.g. of the last optimiser step); it can make the
    selection faster and never changes the result.
    """
    _select_scores(scores, "topk_select")
    k = _checks.check_k(k, scores.numel())
    return _ops.topk_select([scores.detach()], k, _hint(hint, scores))[0]


def topk_select(scores: Union[Tensor, Sequence[Tensor]], k: int, *, hint: Optional[Tensor] = None):
    """Exact top-k as ``(threshold, cut)``: entry i is kept iff s > thr or (s == thr and i < cut).

    ``scores`` may be a list, selected together as if concatenated (flat indices run on in
    list order). This is the device-side description the masked ops consume.
    """
    tensors = _select_scores(scores, "topk_select", single=None)
    k = _checks.check_k(k, sum(t.numel() for t in tensors))
    return _ops.topk_select([t.detach() for t in tensors], k, _hint(hint, tensors[0]))


def topk_mask(scores: Tensor, density: float, *, hint: Optional[Tensor] = None) -> Tensor:
    """Bool mask keeping exactly k = round(density * numel) (at least 1) largest scores.

    Ties are kept lowest flat index first: the result equals
    ``torch.sort(scores.flatten(), descending=True, stable=True).indices[:k]``.
    """
    _select_scores(scores, "topk_keep_mask")
    k = _checks.k_from_density(density, scores.numel())
    return _ops.topk_keep_mask([scores.detach()], k, _hint(hint, scores))[0]


def global_topk_masks(scores: Sequence[Tensor], density: float) -> list[Tensor]:
    """One top-k over all tensors together (never concatenated): a mask per tensor."""
    tensors = [t.detach() for t in _select_scores(scores, "topk_keep_mask", single=False)]
    k = _checks.k_from_density(density, sum(t.numel() for t in tensors))
    return _ops.topk_keep_mask(tensors, k, None)


def layerwise_topk_masks(scores: Sequence[Tensor], density: Union[float, Sequence[float]]) -> list[Tensor]:
    """An independent top-k per tensor (each with its own density), batched into one select."""
    tensors = [t.detach() for t in _select_scores(scores, "batched_topk_select", single=False)]
    if _checks.is_real(density):
        densities = [density] * len(tensors)
    elif isinstance(density, (str, bytes)) or not isinstance(density, Iterable):
        raise TypeError(f"density must be a number or a list of numbers (one per tensor), got {density!r}")
    else:
        densities = list(density)
    if len(densities) != len(tensors):
        raise ValueError(f"density has {len(densities)} entries but scores has {len(tensors)} tensors")
    ks = [_checks.k_from_density(d, t.numel()) for d, t in zip(densities, tensors)]
    thrs, cuts = _ops.batched_topk_select(tensors, ks, None)
    return [_ops.keep_mask(t, thrs[i], cuts[i], 0) for i, t in enumerate(tensors)]


def _select_scores(scores: object, kernel: str, single: Optional[bool] = True) -> list[Tensor]:
    """The checked scores of a selection, as a list: a tensor (``single``), a list of tensors
    (``single=False``) or either (``None``). NaN / inf are checked here only if the select ``kernel``
    that runs does not check them itself."""
    if single or (single is None and isinstance(scores, Tensor)):
        tensors, names = [_checks.check_scores(scores, finite=False)], ["scores"]
    else:
        tensors = _checks.check_score_list(scores, finite=False)
        names = [f"scores[{i}]" for i in range(len(tensors))]
    _checks.check_select_finite(tensors, names, kernel)
    return tensors


def _hint(hint: Optional[Tensor], scores: Tensor) -> Optional[Tensor]:
    if hint is None:
        return None
    if not isinstance(hint, Tensor) or hint.numel() != 1:
        raise TypeError(f"hint must be a one-element tensor (a previous threshold), got {hint!r}")
    _checks.check_real_dtype(hint, "hint")
    _checks.check_scalar_device(hint, "hint", scores.device)
    return hint.detach().reshape(()).to(device=scores.device, dtype=scores.dtype)


def selection(scores: Tensor, density: Optional[float], threshold: Optional[Union[Number, Tensor]],
              hint: Optional[Tensor] = None, *, fused_check: bool = False, empty_ok: bool = False
              ) -> tuple[Tensor, Tensor]:
    """``(thr, cut)`` for top-k by ``density`` or for ``scores >= threshold`` (exactly one given).

    The one value check of a call (NaN / inf scores or threshold) happens here, except where the
    kernel makes it in the pass that reads the scores: for top-k, a select kernel that checks
    (registry ``CHECKS_FINITE``); with ``fused_check`` and a threshold, the caller's op (the native
    masked layers' ``masked_weight``, :func:`_fused_check`). ``empty_ok``: empty scores (a masked
    linear without weights) select nothing (:func:`_empty_selection`); else they are refused.
    """
    _checks.check_mask_spec(density, threshold)
    if empty_ok and isinstance(scores, Tensor) and scores.numel() == 0:
        _checks.check_tensor(scores, "scores")
        return _empty_selection(scores, threshold, fused_check)
    if density is not None:
        _select_scores(scores, "topk_select")
        k = _checks.k_from_density(density, scores.numel())
        return _ops.topk_select([scores.detach()], k, _hint(hint, scores))
    _checks.check_scores(scores, finite=not fused_check)
    return _threshold_selection(scores, threshold, fused_check)


def _empty_selection(scores: Tensor, threshold: Optional[Union[Number, Tensor]],
                     fused_check: bool) -> tuple[Tensor, Tensor]:
    """The selection of empty scores (a linear layer with in_features or out_features 0): a threshold as ever; by
    density, k = 0, the only k over no scores (a select op's k is in [1, numel] and refuses empty scores),
    as ``(thr, cut) = (0, 0)``: no select kernel runs, and the keep rule has nothing to keep."""
    if threshold is not None:
        return _threshold_selection(scores, threshold, fused_check)
    shared = _ops._plain_eager((scores,))
    return (_device_scalar(0.0, scores.dtype, scores.device, shared),
            _device_scalar(0, torch.int64, scores.device, shared))


def _threshold_selection(scores: Tensor, threshold: Union[Number, Tensor],
                         fused_check: bool = False) -> tuple[Tensor, Tensor]:
    """``(thr, cut)`` meaning ``scores >= threshold`` (threshold cast to the scores' dtype, then
    checked finite, here or, with ``fused_check``, by the op's kernel: the same rule either way)."""
    shared = _ops._plain_eager((scores,))  # traced or fake tensors are made in the trace, never kept
    if isinstance(threshold, Tensor):
        _checks.check_scalar_device(threshold, "threshold", scores.device)
        thr = threshold.detach().reshape(()).to(device=scores.device, dtype=scores.dtype)
        if not fused_check:
            _checks.check_finite(thr, "threshold")
    else:
        thr = _device_scalar(float(threshold), scores.dtype, scores.device, shared, "threshold")
    return thr, _device_scalar(KEEP_ALL_TIES, torch.int64, scores.device, shared)


_SCALARS: dict[tuple, Tensor] = {}
_MAX_SCALARS = 256
"""At most this many cached scalars (a threshold annealed per step makes a new one each step); past
it a new value gets its own tensor. None is ever evicted: a captured CUDA graph may read it."""


def _overflow_limit(dtype: torch.dtype) -> float:
    """The smallest positive Python float that ``torch.full(..., dtype=dtype)`` makes inf or refuses
    (float32 raises past its max), by bisection over the ordered bit patterns of positive float64s:
    exact whatever rounding path the conversion takes."""
    as_float = lambda bits: struct.unpack("<d", struct.pack("<q", bits))[0]  # noqa: E731

    def overflows(bits: int) -> bool:
        try:
            return math.isinf(torch.full((), as_float(bits), dtype=dtype).item())
        except RuntimeError:  # "value cannot be converted to type float without overflow"
            return True

    lo, hi = 0, struct.unpack("<q", struct.pack("<d", math.inf))[0]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if overflows(mid) else (mid, hi)
    return as_float(hi)


_OVERFLOW_LIMITS = {dtype: _overflow_limit(dtype) for dtype in (torch.float32, torch.float16, torch.bfloat16)}
"""Made at import (about 0.3 ms; float64 needs none: a finite Python float stays finite there): a
threshold is checked against them by comparisons, which traced code (a SymFloat under torch.compile)
and every call that makes its own scalar can afford."""


def _capturing(is_cuda: bool) -> bool:
    """Whether work on a CUDA device (``is_cuda``) is being captured into a CUDA graph: what it makes
    is filled only by a replay, so no cache may hand it to an eager call. Takes the flag, not a
    device: ``tensor.is_cuda`` costs 0.05 us where ``tensor.device`` builds a device object (0.3 us
    with the call; a module forward asks once or twice)."""
    return is_cuda and torch.cuda.is_current_stream_capturing()


def _device_scalar(value: Number, dtype: torch.dtype, device: torch.device, shared: bool,
                   finite_name: Optional[str] = None) -> Tensor:
    """``value`` as a 0-dim ``dtype`` tensor on ``device``; when ``shared``, made once per (value,
    dtype, device) and returned to every call (never written): a threshold call then launches no
    fill for its (thr, cut) (two per call before, each a ~5 us launch on a GPU; docs/masked.md).
    ``finite_name``: a value that overflows ``dtype`` (1e5 in float16) is a ValueError naming it, as
    its inf would be in the native ops' fused check; checked whenever a tensor is made (a shared one
    was checked when it was made).
    Never shared when made while a CUDA graph is being captured: its fill would only be recorded, not
    run, so the shared tensor would hold garbage for every later eager call (a cached one, filled
    before the capture, is safe to read in it)."""
    key = (value, dtype, device)
    t = _SCALARS.get(key) if shared else None
    if t is not None:
        return t
    limit = _OVERFLOW_LIMITS.get(dtype)
    if finite_name is not None and limit is not None and not -limit < value < limit:
        raise ValueError(f"{finite_name} {value!r} is not finite in the scores' dtype {dtype}")
    if not shared or len(_SCALARS) >= _MAX_SCALARS or _capturing(device.type == "cuda"):
        return torch.full((), value, dtype=dtype, device=device)
    with torch.inference_mode(False):  # a normal tensor even in inference mode: it is saved for backward
        t = _SCALARS[key] = torch.full((), value, dtype=dtype, device=device)
    return t


def _fused_check(native: Optional[object], threshold: object) -> bool:
    """Whether a threshold (not None) is given and the layer op runs the native kernels (``native``,
    the op's :func:`.._ops._native_layer_op` for x: backends "cpp", "cuda"), whose forward checks
    the scores and thr finite in the pass that reads them (masked_weight: csrc/cpu/masked.cpp,
    csrc/cuda/masked.cu; the gate: csrc/cpu/gate.cpp, csrc/cuda/gate.cu; a ValueError on the CPU, a
    device-side assert on CUDA): the API then skips its own check, a pass over the scores and, on a
    GPU, 5 launches (docs/masked.md). The modules decide the same way (bise_kernels/nn/)."""
    return threshold is not None and native is not None


# ----------------------------------------------------------------------------- masked ops


def _autocast(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """x, weight and bias as torch.autocast hands them to nn.Linear / nn.Conv2d: in its dtype for x's
    device (float64 and non-float tensors stay), so a masked layer takes the lower-precision output of
    a dense one as they do (the scores keep their dtype: the selection and its gradient are theirs).
    Costs one 0.1 us test outside autocast."""
    if not torch._C._is_any_autocast_enabled():
        return x, weight, bias
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device)

    def cast(t: Optional[Tensor]) -> Optional[Tensor]:
        eligible = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return cast(x), cast(weight), cast(bias)


def masked_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, *,
    density: Optional[float] = None, threshold: Optional[Union[Number, Tensor]] = None,
    estimator: str = "ste", temperature: float = 1.0,
) -> Tensor:
    """``x @ (weight * M).T + bias`` with M = top-k(scores, density) or scores >= threshold.

    ``scores`` is weight-shaped (one per weight) or ``(out_features,)`` (whole neurons). The score
    gradient is ``dL/dW_eff * weight * slope`` (slope 1 for "ste", sigmoid'(s/T)/T for "sigmoid").
    Under torch.autocast, x, weight and bias run in its dtype (:func:`_autocast`).
    """
    x, weight, bias = _autocast(x, weight, bias)
    _checks.check_masked_linear(x, weight, bias, scores)
    _checks.check_estimator(estimator, temperature)
    native = _ops._native_layer_op("masked_linear", x)
    thr, cut = selection(scores, density, threshold, fused_check=_fused_check(native, threshold), empty_ok=True)
    return _ops.masked_linear.run(native, x, weight, bias, scores, thr, cut, estimator, float(temperature))


def masked_conv2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, *,
    density: Optional[float] = None, threshold: Optional[Union[Number, Tensor]] = None,
    stride=1, padding=0, dilation=1, groups: int = 1, estimator: str = "ste", temperature: float = 1.0,
) -> Tensor:
    """``conv2d(x, weight * M, bias)``; structured scores have shape ``(out_channels,)``; autocast as
    :func:`masked_linear`. An unbatched x ``(C, H, W)`` gives an unbatched output, as in F.conv2d."""
    if isinstance(x, Tensor) and x.dim() == 3:
        return masked_conv2d(x.unsqueeze(0), weight, bias, scores, density=density, threshold=threshold, stride=stride,
                             padding=padding, dilation=dilation, groups=groups, estimator=estimator,
                             temperature=temperature).squeeze(0)
    x, weight, bias = _autocast(x, weight, bias)
    _, stride, padding, dilation = _checks.check_masked_conv2d(x, weight, bias, scores, None, None, stride, padding,
                                                               dilation, groups)
    _checks.check_estimator(estimator, temperature)
    native = _ops._native_layer_op("masked_conv2d", x)
    thr, cut = selection(scores, density, threshold, fused_check=_fused_check(native, threshold))
    return _ops.masked_conv2d.run(native, x, weight, bias, scores, thr, cut, list(stride), list(padding),
                                  list(dilation), int(groups), estimator, float(temperature))


def channel_gate(
    x: Tensor, scores: Tensor, *, threshold: Optional[Union[Number, Tensor]] = None, density: Optional[float] = None,
    dim: int = 1, estimator: str = "sigmoid", temperature: float = 1.0,
) -> Tensor:
    """``x * g`` broadcast along ``dim``; g_i = 1 iff scores_i >= threshold (or top-k by density).

    The BISE gate: the score gradient is ``sum(dL/dy * x over all but dim) * slope``. The rule is
    :func:`_gate_threshold`'s: threshold 0.0 unless ``density`` (top-k) is given; not both.
    """
    threshold = _gate_threshold(density, threshold)
    dim = _checks.check_channel_gate(x, scores, None, None, dim)
    _checks.check_estimator(estimator, temperature)
    native = _gate_op(x)
    thr, cut = selection(scores, density, threshold, fused_check=_fused_check(native, threshold))
    return _ops.channel_gate.run(native, x, scores, thr, cut, dim, estimator, float(temperature))


def _gate_threshold(density: Optional[float], threshold: Optional[Union[Number, Tensor]]
                   ) -> Optional[Union[Number, Tensor]]:
    """A channel gate's threshold: 0.0 (the BISE gate) when neither it nor ``density`` is given; both
    given is left to :func:`.._checks.check_mask_spec` to refuse, as for the masked layers."""
    return 0.0 if density is None and threshold is None else threshold


def _gate_op(x: Tensor) -> Optional[object]:
    """The native channel_gate op for x as :func:`_fused_check` takes it: its forward checks the
    scores and thr in the pass that reads them, except for an empty x (no launch, no check), where
    the API checks: None then (the op still runs the native kernels)."""
    return _ops._native_layer_op("channel_gate", x) if x.numel() else None
