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
    _checks.check_scores(scores)
    k = _checks.check_k(k, scores.numel())
    return _ops.topk_select([scores.detach()], k, _hint(hint, scores))[0]


def topk_select(scores: Union[Tensor, Sequence[Tensor]], k: int, *, hint: Optional[Tensor] = None):
    """Exact top-k as ``(threshold, cut)``: entry i is kept iff s > thr or (s == thr and i < cut).

    ``scores`` may be a list, selected together as if concatenated (flat indices run on in
    list order). This is the device-side description the masked ops consume.
    """
    tensors = [_checks.check_scores(scores)] if isinstance(scores, Tensor) else _checks.check_score_list(scores)
    k = _checks.check_k(k, sum(t.numel() for t in tensors))
    return _ops.topk_select([t.detach() for t in tensors], k, _hint(hint, tensors[0]))


def topk_mask(scores: Tensor, density: float, *, hint: Optional[Tensor] = None) -> Tensor:
    """Bool mask keeping exactly k = round(density * numel) (at least 1) largest scores.

    Ties are kept lowest flat index first: the result equals
    ``torch.sort(scores.flatten(), descending=True, stable=True).indices[:k]``.
    """
    _checks.check_scores(scores)
    k = _checks.k_from_density(density, scores.numel())
    thr, cut = _ops.topk_select([scores.detach()], k, _hint(hint, scores))
    return _ops.keep_mask(scores.detach(), thr, cut, 0)


def global_topk_masks(scores: Sequence[Tensor], density: float) -> list[Tensor]:
    """One top-k over all tensors together (never concatenated): a mask per tensor."""
    tensors = [t.detach() for t in _checks.check_score_list(scores)]
    k = _checks.k_from_density(density, sum(t.numel() for t in tensors))
    thr, cut = _ops.topk_select(tensors, k, None)
    masks, offset = [], 0
    for t in tensors:
        masks.append(_ops.keep_mask(t, thr, cut, offset))
        offset += t.numel()
    return masks


def layerwise_topk_masks(scores: Sequence[Tensor], density: Union[float, Sequence[float]]) -> list[Tensor]:
    """An independent top-k per tensor (each with its own density), batched into one select."""
    tensors = [t.detach() for t in _checks.check_score_list(scores)]
    densities = [density] * len(tensors) if isinstance(density, (int, float)) else list(density)
    if len(densities) != len(tensors):
        raise ValueError(f"density has {len(densities)} entries but scores has {len(tensors)} tensors")
    ks = [_checks.k_from_density(d, t.numel()) for d, t in zip(densities, tensors)]
    thrs, cuts = _ops.batched_topk_select(tensors, ks, None)
    return [_ops.keep_mask(t, thrs[i], cuts[i], 0) for i, t in enumerate(tensors)]


def _hint(hint: Optional[Tensor], scores: Tensor) -> Optional[Tensor]:
    if hint is None:
        return None
    if not isinstance(hint, Tensor) or hint.numel() != 1:
        raise TypeError(f"hint must be a one-element tensor (a previous threshold), got {hint!r}")
    return hint.detach().reshape(()).to(device=scores.device, dtype=scores.dtype)


def selection(scores: Tensor, density: Optional[float], threshold: Optional[Union[Number, Tensor]],
              hint: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``(thr, cut)`` for top-k by ``density`` or for ``scores >= threshold`` (exactly one given)."""
    _checks.check_mask_spec(density, threshold)
    _checks.check_scores(scores)
    return _checked_selection(scores, density, threshold, hint)


def _checked_selection(scores: Tensor, density: Optional[float], threshold: Optional[Union[Number, Tensor]],
                       hint: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """:func:`selection` for scores that are already validated (one finiteness pass per call, not two)."""
    if density is not None:
        k = _checks.k_from_density(density, scores.numel())
        return _ops.topk_select([scores.detach()], k, _hint(hint, scores))
    return threshold_selection(scores, threshold)


def threshold_selection(scores: Tensor, threshold: Union[Number, Tensor]) -> tuple[Tensor, Tensor]:
    """``(thr, cut)`` meaning ``scores >= threshold`` (threshold cast to the scores' dtype)."""
    if isinstance(threshold, Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold must be a scalar or one-element tensor, got shape {tuple(threshold.shape)}")
        thr = threshold.detach().reshape(()).to(device=scores.device, dtype=scores.dtype)
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        thr = torch.tensor(float(threshold), dtype=scores.dtype, device=scores.device)
    else:
        raise TypeError(f"threshold must be a float or a one-element tensor, got {threshold!r}")
    cut = torch.full((), KEEP_ALL_TIES, dtype=torch.int64, device=scores.device)
    return thr, cut


# ----------------------------------------------------------------------------- masked ops


def _check_layer(x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor) -> None:
    _checks.check_tensor(x, "x")
    _checks.check_scores(scores)
    _checks.check_layer_scores(scores, weight)
    _checks.check_like(weight, x, "weight", "x")
    if bias is not None:
        _checks.check_tensor(bias, "bias")
        _checks.check_like(bias, x, "bias", "x")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def masked_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, *,
    density: Optional[float] = None, threshold: Optional[Union[Number, Tensor]] = None,
    estimator: str = "ste", temperature: float = 1.0,
) -> Tensor:
    """``x @ (weight * M).T + bias`` with M = top-k(scores, density) or scores >= threshold.

    ``scores`` is weight-shaped (one per weight) or ``(out_features,)`` (whole neurons). The score
    gradient is ``dL/dW_eff * weight * slope`` (slope 1 for "ste", sigmoid'(s/T)/T for "sigmoid").
    """
    _check_layer(x, weight, bias, scores)
    _checks.check_estimator(estimator, temperature)
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} does not match weight of shape {tuple(weight.shape)}")
    _checks.check_mask_spec(density, threshold)
    thr, cut = _checked_selection(scores, density, threshold)
    return _ops.masked_linear(x, weight, bias, scores, thr, cut, estimator, float(temperature))


def masked_conv2d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], scores: Tensor, *,
    density: Optional[float] = None, threshold: Optional[Union[Number, Tensor]] = None,
    stride=1, padding=0, dilation=1, groups: int = 1, estimator: str = "ste", temperature: float = 1.0,
) -> Tensor:
    """``conv2d(x, weight * M, bias)``; structured scores have shape ``(out_channels,)``."""
    _check_layer(x, weight, bias, scores)
    _checks.check_estimator(estimator, temperature)
    stride, padding, dilation = (_checks.check_pair(v, n) for v, n in
                                 ((stride, "stride"), (padding, "padding"), (dilation, "dilation")))
    _checks.check_conv_shapes(x, weight, groups)
    _checks.check_mask_spec(density, threshold)
    thr, cut = _checked_selection(scores, density, threshold)
    return _ops.masked_conv2d(x, weight, bias, scores, thr, cut, list(stride), list(padding), list(dilation),
                              groups, estimator, float(temperature))


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
    _checks.check_tensor(x, "x")
    _checks.check_scores(scores)
    _checks.check_estimator(estimator, temperature)
    dim = _checks.check_dim(dim, x.dim())
    if scores.shape != (x.shape[dim],):
        raise ValueError(f"scores must have shape ({x.shape[dim]},) (x.shape[{dim}]), got {tuple(scores.shape)}")
    _checks.check_like(scores, x, "scores", "x", dtype=False)
    _checks.check_mask_spec(density, threshold)
    thr, cut = _checked_selection(scores, density, threshold)
    return _ops.channel_gate(x, scores, thr, cut, dim, estimator, float(temperature))
