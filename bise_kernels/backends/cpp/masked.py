"""Masked layers and channel gate on the fused C++ kernels (csrc/cpu/masked.cpp, gate.cpp).

Each masked layer is: one fused pass producing ``W_eff = W * keep(scores)`` (no bool mask, no
indices), then the dense ATen op (``F.linear`` / ``F.conv2d`` / ``convolution_backward``); the
backward builds ``grad_x`` from a recomputed ``W_eff`` (freed before the weight gradient), then
``grad_W_eff`` by the dense weight-gradient op, then one fused pass turning it into the score
gradient and, only if needed, masking it in place into the weight gradient. At most one
weight-sized temporary is alive at a time and nothing weight-sized is saved for backward.

:class:`FusedMaskedKernels` holds this composition once; the "cuda" backend reuses it with its
own fused ops (``<op>_cuda``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._extension import ext_ops
from ..reference import MASKED_KERNELS


class FusedMaskedKernels:
    """The masked_* / channel_gate_* kernels of reference.py over four fused extension ops."""

    def __init__(self, suffix: str = ""):
        ops = ext_ops()
        self.masked_weight = getattr(ops, "masked_weight" + suffix)
        self.score_grad = getattr(ops, "score_grad" + suffix)
        self.gate_forward = getattr(ops, "gate_forward" + suffix)
        self.gate_backward = getattr(ops, "gate_backward" + suffix)

    def _weight_grads(self, grad_w_eff, weight, scores, thr, cut, estimator, temperature, need_w, need_s):
        """(grad_weight, grad_scores) from grad_W_eff in one fused pass (grad_weight reuses its memory)."""
        grad_w_eff = grad_w_eff.contiguous()
        gs = self.score_grad(grad_w_eff, weight, scores, thr, cut, estimator, float(temperature), need_s, need_w)
        return (grad_w_eff if need_w else None), (gs if need_s else None)

    def masked_linear_forward(self, x, weight, bias, scores, thr, cut):
        return F.linear(x, self.masked_weight(weight, scores, thr, cut), bias)

    def masked_linear_backward(self, grad_y, x, weight, scores, thr, cut, estimator, temperature, needs):
        need_x, need_w, need_b, need_s = needs
        gx = gw = gb = gs = None
        if need_x:
            gx = grad_y @ self.masked_weight(weight, scores, thr, cut)
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        if need_w or need_s:
            grad_w_eff = g2.t() @ x.reshape(-1, x.shape[-1])
            gw, gs = self._weight_grads(grad_w_eff, weight, scores, thr, cut, estimator, temperature, need_w, need_s)
        if need_b:
            gb = g2.sum(0)
        return gx, gw, gb, gs

    def masked_conv2d_forward(self, x, weight, bias, scores, thr, cut, stride, padding, dilation, groups):
        return F.conv2d(x, self.masked_weight(weight, scores, thr, cut), bias, stride, padding, dilation, groups)

    def masked_conv2d_backward(self, grad_y, x, weight, scores, thr, cut, stride, padding, dilation, groups,
                               estimator, temperature, needs):
        need_x, need_w, need_b, need_s = needs
        gx = gw = gb = gs = None
        conv = (None, stride, padding, dilation, False, [0, 0], groups)
        if need_x:
            w_eff = self.masked_weight(weight, scores, thr, cut)
            gx = torch.ops.aten.convolution_backward(grad_y, x, w_eff, *conv, [True, False, False])[0]
            del w_eff
        if need_w or need_s:
            # Only the weight's shape is read for the weight gradient.
            grad_w_eff = torch.ops.aten.convolution_backward(grad_y, x, weight, *conv, [False, True, False])[1]
            gw, gs = self._weight_grads(grad_w_eff, weight, scores, thr, cut, estimator, temperature, need_w, need_s)
        if need_b:
            gb = grad_y.sum((0, 2, 3))
        return gx, gw, gb, gs

    def channel_gate_forward(self, x, scores, thr, cut, dim):
        return self.gate_forward(x, scores, thr, cut, dim)

    def channel_gate_backward(self, grad_y, x, scores, thr, cut, dim, estimator, temperature, needs):
        need_x, need_s = needs
        gx, gs = self.gate_backward(grad_y, x, scores, thr, cut, dim, estimator, float(temperature), need_x, need_s)
        return (gx if need_x else None), (gs if need_s else None)

    KERNELS = MASKED_KERNELS


_kernels = FusedMaskedKernels()
KERNELS = FusedMaskedKernels.KERNELS
globals().update({name: getattr(_kernels, name) for name in KERNELS})
