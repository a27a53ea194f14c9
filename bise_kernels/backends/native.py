"""The kernels of reference.py over the compiled ops ``torch.ops.bise_kernels_ext`` (csrc/).

Shared by the "cpp" (CPU) and "cuda" backends: each extension op has one schema
(csrc/library.cpp) and a CPU and a CUDA implementation, picked by the dispatcher from the
tensors' device, so the composition below is written once. Importing this module fails
(making those backends unavailable) when the compiled extension is missing.

Masked layers: one fused pass producing ``W_eff = W * keep(scores)`` (``masked_weight``: no bool
mask, no indices), then the dense ATen op (``F.linear`` / ``F.conv2d`` / ``convolution_backward``:
MKL/oneDNN on CPU, cuBLAS/cuDNN on GPU). The backward builds ``grad_x`` from a recomputed
``W_eff`` (freed before the weight gradient), then ``grad_W_eff`` by the dense weight-gradient op,
then one fused pass (``masked_score_grad``) turning it into the score gradient and, only if
needed, masking it in place into the weight gradient. At most one weight-sized temporary is alive
at a time, nothing weight-sized is saved for backward, and nothing here waits for the device.
The forward's ``masked_weight`` also checks the scores and thr finite in its pass (the API leaves
its own check to it on these backends, bise_kernels/functional.py); the backward's recompute of
``W_eff`` skips that check.
The ``*_keep`` kernels (linear and conv2d) are the same composition reading a bool keep mask (the
selection packed once per step, ``keep_mask``) instead of the scores: ext ``keep_weight`` and
``keep_score_grad``.
The same composition, forward and backward, is also one extension op per layer op with its
autograd node in C++ (csrc/masked_autograd.cpp, :func:`layer_op`): the eager path of
bise_kernels/_ops.py when these kernels are the selected ones.
``W_eff`` is a fresh tensor per call: the caching allocators hand the block just freed straight
back, so a buffer kept here would save no allocation and add state.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .._extension import ext_ops

_ext = ext_ops()

# ----------------------------------------------------------------------------- selection


def topk_select(
    tensors: Sequence[torch.Tensor], k: int, hint: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the concatenation of ``tensors`` (never concatenated): ``(thr, cut)``."""
    return _ext.topk_select(list(tensors), k, hint)


def batched_topk_select(
    tensors: Sequence[torch.Tensor], ks: Sequence[int], hints: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One independent top-k per tensor, all in one call: thresholds and cuts of shape (L,)."""
    return _ext.batched_topk_select(list(tensors), list(ks), hints)


def keep_mask(scores: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Bool mask ``s > thr or (s == thr and offset + flat_index < cut)`` in one pass."""
    return _ext.keep_mask(scores, thr, cut, offset)


def topk_keep_mask(tensors: Sequence[torch.Tensor], k: int, hint: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """The keep masks of the exact top-k over the concatenation, one per tensor (CPU: written by the
    selection's fused pass when it holds rank k)."""
    return _ext.topk_keep_mask(list(tensors), k, hint)


# ----------------------------------------------------------------------------- masked layers


def _weight_grads(grad_w_eff, weight, scores, thr, cut, estimator, temperature, need_w, need_s):
    """(grad_weight, grad_scores) from grad_W_eff in one fused pass (grad_weight reuses its memory)."""
    grad_w_eff = grad_w_eff.contiguous()
    gs = _ext.masked_score_grad(grad_w_eff, weight, scores, thr, cut, estimator, float(temperature), need_s, need_w)
    return (grad_w_eff if need_w else None), (gs if need_s else None)


def _keep_weight_grads(grad_w_eff, weight, scores, keep, estimator, temperature, need_w, need_s):
    """:func:`_weight_grads` with the selection packed into ``keep``."""
    grad_w_eff = grad_w_eff.contiguous()
    gs = _ext.keep_score_grad(grad_w_eff, weight, scores, keep, estimator, float(temperature), need_s, need_w)
    return (grad_w_eff if need_w else None), (gs if need_s else None)


def masked_linear_forward(x, weight, bias, scores, thr, cut):
    return F.linear(x, _ext.masked_weight(weight, scores, thr, cut), bias)


def _linear_backward(grad_y, x, needs, w_eff, weight_grads):
    """The backward of both masked linears: ``w_eff()`` builds W_eff for grad_x, ``weight_grads(grad_W_eff,
    need_w, need_s)`` makes the weight and score gradients in one fused pass."""
    need_x, need_w, need_b, need_s = needs
    gx = gw = gb = gs = None
    if need_x:
        gx = grad_y @ w_eff()
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    if need_w or need_s:
        gw, gs = weight_grads(g2.t() @ x.reshape(-1, x.shape[-1]), need_w, need_s)
    if need_b:
        gb = g2.sum(0)
    return gx, gw, gb, gs


def masked_linear_backward(grad_y, x, weight, scores, thr, cut, estimator, temperature, needs):
    return _linear_backward(
        grad_y, x, needs, lambda: _ext.masked_weight(weight, scores, thr, cut, False),
        lambda g, need_w, need_s: _weight_grads(g, weight, scores, thr, cut, estimator, temperature, need_w, need_s))


def masked_linear_keep_forward(x, weight, bias, keep):
    return F.linear(x, _ext.keep_weight(weight, keep), bias)


def masked_linear_keep_backward(grad_y, x, weight, scores, keep, estimator, temperature, needs):
    return _linear_backward(
        grad_y, x, needs, lambda: _ext.keep_weight(weight, keep),
        lambda g, need_w, need_s: _keep_weight_grads(g, weight, scores, keep, estimator, temperature, need_w, need_s))


def masked_conv2d_forward(x, weight, bias, scores, thr, cut, stride, padding, dilation, groups):
    return F.conv2d(x, _ext.masked_weight(weight, scores, thr, cut), bias, stride, padding, dilation, groups)


def _conv2d_backward(grad_y, x, weight, stride, padding, dilation, groups, needs, w_eff, weight_grads):
    """The backward of both masked conv2ds (``w_eff`` and ``weight_grads`` as in :func:`_linear_backward`)."""
    need_x, need_w, need_b, need_s = needs
    gx = gw = gb = gs = None
    conv = (None, stride, padding, dilation, False, [0, 0], groups)
    if need_x:
        gx = torch.ops.aten.convolution_backward(grad_y, x, w_eff(), *conv, [True, False, False])[0]
    if need_w or need_s:
        # Only the weight's shape is read for the weight gradient.
        grad_w_eff = torch.ops.aten.convolution_backward(grad_y, x, weight, *conv, [False, True, False])[1]
        gw, gs = weight_grads(grad_w_eff, need_w, need_s)
    if need_b:
        gb = grad_y.sum((0, 2, 3))
    return gx, gw, gb, gs


def masked_conv2d_backward(grad_y, x, weight, scores, thr, cut, stride, padding, dilation, groups, estimator,
                           temperature, needs):
    return _conv2d_backward(
        grad_y, x, weight, stride, padding, dilation, groups, needs,
        lambda: _ext.masked_weight(weight, scores, thr, cut, False),
        lambda g, need_w, need_s: _weight_grads(g, weight, scores, thr, cut, estimator, temperature, need_w, need_s))


def masked_conv2d_keep_forward(x, weight, bias, keep, stride, padding, dilation, groups):
    return F.conv2d(x, _ext.keep_weight(weight, keep), bias, stride, padding, dilation, groups)


def masked_conv2d_keep_backward(grad_y, x, weight, scores, keep, stride, padding, dilation, groups, estimator,
                                temperature, needs):
    return _conv2d_backward(
        grad_y, x, weight, stride, padding, dilation, groups, needs, lambda: _ext.keep_weight(weight, keep),
        lambda g, need_w, need_s: _keep_weight_grads(g, weight, scores, keep, estimator, temperature, need_w, need_s))


def channel_gate_forward(x, scores, thr, cut, dim):
    return _ext.channel_gate_forward(x, scores, thr, cut, dim)


def channel_gate_backward(grad_y, x, scores, thr, cut, dim, estimator, temperature, needs):
    need_x, need_s = needs
    gx, gs = _ext.channel_gate_backward(grad_y, x, scores, thr, cut, dim, estimator, float(temperature), need_x,
                                        need_s)
    return (gx if need_x else None), (gs if need_s else None)


# ----------------------------------------------------------------------------- one call per layer op

_LAYER_OPS = ("masked_linear", "masked_linear_keep", "masked_conv2d", "masked_conv2d_keep", "channel_gate")


def layer_op(name: str, forward: Callable, backward: Callable) -> Optional[Callable]:
    """The extension op computing layer op ``name`` (forward and backward, csrc/masked_autograd.cpp)
    if ``forward`` and ``backward`` are this module's kernels of it, else None."""
    if name in _LAYER_OPS and forward is globals()[f"{name}_forward"] and backward is globals()[f"{name}_backward"]:
        return getattr(_ext, name).default
    return None
