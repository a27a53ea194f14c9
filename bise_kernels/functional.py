"""The public functional API: validate arguments, resolve the mask selection, call the ops."""

from __future__ import annotations

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
    tensors = _select_scores(scores, "topk_select")
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
    densities = [density] * len(tensors) if _checks.is_real(density) else list(density)
    if len(densities) != len(tensors):
        raise ValueError(f"density has {len(densities)} entries but scores has {len(tensors)} tensors")
    ks = [_checks.k_from_density(d, t.numel()) for d, t in zip(densities, tensors)]
    thrs, cuts = _ops.batched_topk_select(tensors, ks, None)
    return [_ops.keep_mask(t, thrs[i], cuts[i], 0) for i, t in enumerate(tensors)]


def _select_scores(scores: object, kernel: str, single: bool = True) -> list[Tensor]:
    """The checked scores of a selection (a tensor, if ``single``, or a list), as a list. NaN / inf
    are checked here only if the select ``kernel`` that runs does not check them itself."""
    if single and isinstance(scores, Tensor):
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
    return hint.detach().reshape(()).to(device=scores.device, dtype=scores.dtype)


def selection(scores: Tensor, density: Optional[float], threshold: Optional[Union[Number, Tensor]],
              hint: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(thr, cut)`` for top-k by ``density`` or for ``scores >= threshold`` (exactly one given).

    The one value check of a call (NaN / inf scores or threshold) happens here (for top-k, in the
    select kernel where it makes it).
    """
    _checks.check_mask_spec(density, threshold)
    if density is not None:
        _select_scores(scores, "topk_select")
        k = _checks.k_from_density(density, scores.numel())
        return _ops.topk_select([scores.detach()], k, _hint(hint, scores))
    _checks.check_scores(scores)
    return _threshold_selection(scores, threshold)


def _threshold_selection(scores: Tensor, threshold: Union[Number, Tensor]) -> tuple[Tensor, Tensor]:
    """``(thr, cut)`` meaning ``scores >= threshold`` (threshold cast to the scores' dtype)."""
    if isinstance(threshold, Tensor):
        _checks.check_finite(threshold.detach(), "threshold")
        thr = threshold.detach().reshape(()).to(device=scores.device, dtype=scores.dtype)
    else:
        thr = torch.full((), float(threshold), dtype=scores.dtype, device=scores.device)  # no host copy
    cut = torch.full((), KEEP_ALL_TIES, dtype=torch.int64, device=scores.device)
    return thr, cut


# ----------------------------------------------------------------------------- masked ops


def masked_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, *,
    density: Optional[float] = None, threshold: Optional[Union[Number, Tensor]] = None,
    estimator: str = "ste", temperature: float = 1.0,
) -> Tensor:
    """``x @ (weight * M).T + bias`` with M = top-k(scores, density) or scores >= threshold.

    ``scores`` is weight-shaped (one per weight) or ``(out_features,)`` (whole neurons). The score
    gradient is ``dL/dW_eff * weight * slope`` (slope 1 for "ste", sigmoid'(s/T)/T for "sigmoid").
    """
    _checks.check_masked_linear(x, weight, bias, scores)
    _checks.check_estimator(estimator, temperature)
    thr, cut = selection(scores, density, threshold)
    return _ops.masked_linear(x, weight, bias, scores, thr, cut, estimator, float(temperature))


def masked_conv2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, *,
    density: Optional[float] = None, threshold: Optional[Union[Number, Tensor]] = None,
    stride=1, padding=0, dilation=1, groups: int = 1, estimator: str = "ste", temperature: float = 1.0,
) -> Tensor:
    """``conv2d(x, weight * M, bias)``; structured scores have shape ``(out_channels,)``."""
    _, stride, padding, dilation = _checks.check_masked_conv2d(x, weight, bias, scores, None, None, stride, padding,
                                                               dilation, groups)
    _checks.check_estimator(estimator, temperature)
    thr, cut = selection(scores, density, threshold)
    return _ops.masked_conv2d(x, weight, bias, scores, thr, cut, list(stride), list(padding), list(dilation),
                              int(groups), estimator, float(temperature))


def channel_gate(
    x: Tensor, scores: Tensor, *, threshold: Optional[Union[Number, Tensor]] = 0.0, density: Optional[float] = None,
    dim: int = 1, estimator: str = "sigmoid", temperature: float = 1.0,
) -> Tensor:
    """``x * g`` broadcast along ``dim``; g_i = 1 iff scores_i >= threshold (or top-k by density).

    The BISE gate: the score gradient is ``sum(dL/dy * x over all but dim) * slope``. Giving
    ``density`` switches from the threshold to top-k.
    """
    if density is not None:
        threshold = None
    dim = _checks.check_channel_gate(x, scores, None, None, dim)
    _checks.check_estimator(estimator, temperature)
    thr, cut = selection(scores, density, threshold)
    return _ops.channel_gate(x, scores, thr, cut, dim, estimator, float(temperature))
