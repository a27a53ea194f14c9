"""Pure-PyTorch reference backend: THE semantics of every op.

Every other backend implements the same kernel contract and is tested against these
functions. The contract (names, arguments, results) is:

Selection. A top-k selection over the flattened scores (or over the virtual concatenation of
several flattened tensors, in list order) is described by two 0-dim tensors on the scores'
device, so that it never needs a host sync:

* ``thr``: the k-th largest value, in the scores' dtype (a zero threshold is always +0.0);
* ``cut``: an int64 flat index; an entry with flat index ``i`` is kept iff
  ``s > thr or (s == thr and i < cut)``. Ties at the threshold are thus kept lowest index first
  until exactly k entries are kept, which equals the stable descending sort. Threshold mode
  (``s >= t``) is the same rule with ``cut = KEEP_ALL_TIES``.

Kernels (a backend implements any subset; the registry falls back for the rest):

* ``topk_select(tensors, k, hint) -> (thr, cut)``: exact top-k over the concatenation;
  ``hint`` (optional 0-dim tensor, e.g. the previous step's threshold) may only speed it up.
  ``thr`` and ``cut`` here and below are new tensors: never an input or the hint, a view of one,
  or memory the backend reuses (the ops return them as they are, bise_kernels/_ops.py).
* ``batched_topk_select(tensors, ks, hints) -> (thrs, cuts)``: one independent top-k per
  tensor (layerwise mode), results of shape (L,).
* ``keep_mask(scores, thr, cut, offset, check_finite) -> bool``: the mask of the rule above, flat
  indices counted from ``offset``; with ``check_finite``, NaN / inf thr or scores raise as
  ``_checks.check_finite`` does (a ValueError naming "threshold" / "scores" on the CPU; a kernel
  may check in its own pass: registry ``CHECKS_FINITE``).
* ``topk_keep_mask(tensors, k, hint) -> [bool]``: ``topk_select`` then ``keep_mask`` of each
  tensor (offsets running on in list order), in one call, so that a backend can write the masks
  in its selection's last pass. A backend without it gets the composition of its own
  ``topk_select`` and ``keep_mask`` (``bise_kernels/_ops.py``).
* ``masked_linear_forward / masked_linear_backward``, ``masked_conv2d_forward / _backward``,
  ``channel_gate_forward / _backward``: the masked ops. Structured scores (one per output unit)
  use the unit index as flat index. Backward kernels take ``needs`` (which gradients to
  compute) and return ``None`` for the others. The score gradient is the straight-through
  estimate ``dL/dW_eff * W * slope(scores)`` (masked layers) or
  ``sum(dL/dy * x over all but dim) * slope`` (channel gate), see :func:`score_slope`.
  Forward kernels check their arguments (types, shapes, dtypes, devices: bise_kernels/_checks.py;
  no values), backward kernels the estimator and temperature, as the modules leave that to them
  (a temperature set on a module after it was built is checked there).
* ``masked_linear_keep_forward(x, weight, bias, keep)`` /
  ``masked_linear_keep_backward(grad_y, x, weight, scores, keep, estimator, temperature, needs)``:
  masked linear with the selection packed once into ``keep = keep_mask(scores, thr, cut)`` (bool,
  of the scores' shape: 1 byte per weight, or per unit), which both passes read instead of the
  scores; the scores only give the slope. By definition the selection path is the keep path
  with that mask.
* ``masked_conv2d_keep_forward(x, weight, bias, keep, stride, padding, dilation, groups)`` /
  ``masked_conv2d_keep_backward(grad_y, x, weight, scores, keep, stride, padding, dilation, groups,
  estimator, temperature, needs)``: the same for masked conv2d.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _checks

KEEP_ALL_TIES = 2**62
"""A ``cut`` larger than any flat index: every tie at the threshold is kept (``s >= thr``)."""


# ----------------------------------------------------------------------------- selection


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _select_flat(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.sort(flat, descending=True, stable=True).values
    thr = values[k - 1] + 0  # +0: a -0.0 threshold becomes +0.0
    above = (flat > thr).sum()
    ties_needed = k - above  # >= 1
    tie_rank = (flat == thr).cumsum(0)
    # cut = 1 + index of the ties_needed-th tie (first position where the running count reaches it)
    cut = torch.searchsorted(tie_rank, ties_needed.reshape(1)).reshape(()) + 1
    return thr, cut.to(torch.int64)


def topk_select(
    tensors: Sequence[torch.Tensor], k: int, hint: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the concatenation of ``tensors`` (the reference sorts; ``hint`` unused)."""
    _checks.check_select(tensors, [k])
    return _select_flat(_flat(tensors), k)


def batched_topk_select(
    tensors: Sequence[torch.Tensor], ks: Sequence[int], hints: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One independent top-k per tensor; returns thresholds and cuts of shape (len(tensors),)."""
    _checks.check_select(tensors, ks, batched=True)
    pairs = [_select_flat(t.reshape(-1), k) for t, k in zip(tensors, ks)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def keep_mask(scores: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor, offset: int = 0,
              check_finite: bool = False) -> torch.Tensor:
    """Bool mask of ``scores``' shape: ``s > thr or (s == thr and offset + flat_index < cut)``;
    ``check_finite``: NaN / inf thr or scores raise first (``_checks.check_selection_finite``)."""
    if check_finite:
        _checks.check_selection_finite(scores, thr)
    above = scores > thr
    ties = scores == thr
    index = torch.arange(scores.numel(), device=scores.device).reshape(scores.shape) + offset
    return above | (ties & (index < cut))


def topk_keep_mask(
    tensors: Sequence[torch.Tensor], k: int, hint: Optional[torch.Tensor] = None
) -> list[torch.Tensor]:
    """The keep masks of the exact top-k over the concatenation, one per tensor (of its shape)."""
    return compose_topk_keep_mask(topk_select, keep_mask, tensors, k, hint)


def compose_topk_keep_mask(select: Callable, keep: Callable, tensors: Sequence[torch.Tensor], k: int,
                           hint: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """``topk_keep_mask`` from a ``topk_select`` and a ``keep_mask`` kernel: this module's, and a
    backend's own where it lacks the fused kernel (bise_kernels/_ops.py)."""
    thr, cut = select(tensors, k, hint)
    masks, offset = [], 0
    for t in tensors:
        masks.append(keep(t, thr, cut, offset))
        offset += t.numel()
    return masks


# ----------------------------------------------------------------------------- estimators


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, else the dtype itself (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def score_slope(scores: torch.Tensor, estimator: str, temperature: float) -> torch.Tensor | float:
    """d gate / d score: 1 for "ste", sigmoid'(s/tau)/tau for "sigmoid" (at least float32 math)."""
    if estimator == "ste":
        return 1.0
    sig = torch.sigmoid(scores.to(accumulation_dtype(scores.dtype)) / temperature)
    return sig * (1 - sig) / temperature


def _broadcast_unit(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-output-unit values (out,) to broadcast against a weight of shape (out, ...)."""
    if values.dim() == like.dim():
        return values
    return values.reshape(values.shape + (1,) * (like.dim() - 1))


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as 2-d (rows, last dim): ``reshape(-1, n)``, which cannot infer the rows of an empty ``t`` (n == 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _kept_weight(weight, keep):
    return weight * _broadcast_unit(keep, weight).to(weight.dtype)


def _score_grad(grad_w_eff, weight, scores, estimator, temperature):
    """dL/dscores from dL/dW_eff: elementwise for weight-shaped scores, summed per unit otherwise."""
    acc = accumulation_dtype(grad_w_eff.dtype)
    g = grad_w_eff.to(acc) * weight.to(acc)
    if scores.dim() != weight.dim():
        g = g.flatten(1).sum(1)  # flatten: reshape(0, -1) of an empty weight fails
    return (g * score_slope(scores, estimator, temperature)).to(scores.dtype)


# ----------------------------------------------------------------------------- masked linear


def masked_linear_forward(x, weight, bias, scores, thr, cut):
    _checks.check_masked_linear(x, weight, bias, scores, thr, cut)
    return _linear(x, weight, bias, keep_mask(scores, thr, cut))


def masked_linear_backward(grad_y, x, weight, scores, thr, cut, estimator, temperature, needs):
    return masked_linear_keep_backward(grad_y, x, weight, scores, keep_mask(scores, thr, cut), estimator,
                                       temperature, needs)


def masked_linear_keep_forward(x, weight, bias, keep):
    _checks.check_masked_linear_keep(x, weight, bias, keep)
    return _linear(x, weight, bias, keep)


def _linear(x, weight, bias, keep):
    return F.linear(x, _kept_weight(weight, keep), bias)


def masked_linear_keep_backward(grad_y, x, weight, scores, keep, estimator, temperature, needs):
    _checks.check_keep_op_scores(scores, weight, keep)
    _checks.check_estimator(estimator, temperature)
    need_x, need_w, need_b, need_s = needs
    w_eff, mask = _kept_weight(weight, keep), keep
    gx = grad_y @ w_eff if need_x else None
    gw = gs = gb = None
    if need_w or need_s:
        grad_w_eff = as_rows(grad_y).t() @ as_rows(x)
        if need_w:
            gw = grad_w_eff * _broadcast_unit(mask, weight).to(grad_w_eff.dtype)
        if need_s:
            gs = _score_grad(grad_w_eff, weight, scores, estimator, temperature)
    if need_b:
        gb = as_rows(grad_y).sum(0)
    return gx, gw, gb, gs


# ----------------------------------------------------------------------------- masked conv2d


def masked_conv2d_forward(x, weight, bias, scores, thr, cut, stride, padding, dilation, groups):
    _checks.check_masked_conv2d(x, weight, bias, scores, thr, cut, stride, padding, dilation, groups)
    return _conv2d(x, weight, bias, keep_mask(scores, thr, cut), stride, padding, dilation, groups)


def masked_conv2d_backward(
    grad_y, x, weight, scores, thr, cut, stride, padding, dilation, groups, estimator, temperature, needs
):
    return masked_conv2d_keep_backward(grad_y, x, weight, scores, keep_mask(scores, thr, cut), stride, padding,
                                       dilation, groups, estimator, temperature, needs)


def masked_conv2d_keep_forward(x, weight, bias, keep, stride, padding, dilation, groups):
    _checks.check_masked_conv2d_keep(x, weight, bias, keep, stride, padding, dilation, groups)
    return _conv2d(x, weight, bias, keep, stride, padding, dilation, groups)


def _conv2d(x, weight, bias, keep, stride, padding, dilation, groups):
    return F.conv2d(x, _kept_weight(weight, keep), bias, stride, padding, dilation, groups)


def masked_conv2d_keep_backward(
    grad_y, x, weight, scores, keep, stride, padding, dilation, groups, estimator, temperature, needs
):
    _checks.check_keep_op_scores(scores, weight, keep)
    _checks.check_estimator(estimator, temperature)
    need_x, need_w, need_b, need_s = needs
    w_eff, mask = _kept_weight(weight, keep), keep
    gx = gw = gb = gs = None
    if need_x:
        gx = torch.nn.grad.conv2d_input(x.shape, w_eff, grad_y, stride, padding, dilation, groups)
    if need_w or need_s:
        grad_w_eff = torch.nn.grad.conv2d_weight(x, weight.shape, grad_y, stride, padding, dilation, groups)
        if need_w:
            gw = grad_w_eff * _broadcast_unit(mask, weight).to(grad_w_eff.dtype)
        if need_s:
            gs = _score_grad(grad_w_eff, weight, scores, estimator, temperature)
    if need_b:
        gb = grad_y.sum((0, 2, 3))
    return gx, gw, gb, gs


# ----------------------------------------------------------------------------- channel gate


def _gate_shape(x: torch.Tensor, dim: int) -> list[int]:
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    return shape


def channel_gate_forward(x, scores, thr, cut, dim):
    dim = _checks.check_channel_gate(x, scores, thr, cut, dim)
    gate = keep_mask(scores, thr, cut).to(x.dtype).reshape(_gate_shape(x, dim))
    return x * gate


def channel_gate_backward(grad_y, x, scores, thr, cut, dim, estimator, temperature, needs):
    _checks.check_estimator(estimator, temperature)
    need_x, need_s = needs
    gx = gs = None
    if need_x:
        gate = keep_mask(scores, thr, cut).to(grad_y.dtype).reshape(_gate_shape(x, dim))
        gx = grad_y * gate
    if need_s:
        reduce_dims = [d for d in range(x.dim()) if d != dim % x.dim()]
        acc = accumulation_dtype(x.dtype)
        per_unit = grad_y.to(acc) * x.to(acc)
        per_unit = per_unit.sum(reduce_dims) if reduce_dims else per_unit  # 1-d x: sum([]) would sum everything
        gs = (per_unit * score_slope(scores, estimator, temperature)).to(scores.dtype)
    return gx, gs


SELECT_KERNELS = ("topk_select", "batched_topk_select", "keep_mask", "topk_keep_mask")
MASKED_KERNELS = (
    "masked_linear_forward",
    "masked_linear_backward",
    "masked_linear_keep_forward",
    "masked_linear_keep_backward",
    "masked_conv2d_forward",
    "masked_conv2d_backward",
    "masked_conv2d_keep_forward",
    "masked_conv2d_keep_backward",
    "channel_gate_forward",
    "channel_gate_backward",
)
KERNELS = SELECT_KERNELS + MASKED_KERNELS
