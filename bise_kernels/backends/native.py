"""The kernels of reference.py over the compiled ops ``torch.ops.bise_kernels_ext`` (csrc/).

Shared by the "cpp" (CPU) and "cuda" backends: each extension op has one schema
(csrc/library.cpp) and a CPU and a CUDA implementation, picked by the dispatcher from the
tensors' device. Importing this module fails (making those backends unavailable) when the
compiled extension is missing.

Masked layers (composed once, in C++: csrc/masked_autograd.cpp): one fused pass producing
``W_eff = W * keep(scores)`` (``masked_weight``: no bool mask, no indices), then the dense ATen op
(linear / conv2d / convolution_backward: MKL/oneDNN on CPU, cuBLAS/cuDNN on GPU). The backward
builds ``grad_x`` from a recomputed ``W_eff`` (freed before the weight gradient), then
``grad_W_eff`` by the dense weight-gradient op, then one fused pass (``masked_score_grad``)
turning it into the score gradient and, only if needed, masking it in place into the weight
gradient. At most one weight-sized temporary is alive at a time, nothing weight-sized is saved for
backward, and nothing waits for the device. The forward's ``masked_weight`` also checks the scores
and thr finite in its pass (the API leaves its own check to it on these backends,
bise_kernels/functional.py); the backward's recompute of ``W_eff`` skips that check.
The ``*_keep`` kernels (linear and conv2d) are the same composition reading a bool keep mask (the
selection packed once per step, ``keep_mask``) instead of the scores: ext ``keep_weight`` and
``keep_score_grad``.
Each layer op is there three ways over the same C++ functions: ``<op>_forward`` and
``<op>_backward`` (the kernels below, which the Python custom ops of bise_kernels/_ops.py call
under torch.compile, export and opcheck) and ``<op>`` with its autograd node in C++
(:func:`layer_op`: the eager path), so every path computes the same bits.
``W_eff`` is a fresh tensor per call: the caching allocators hand the block just freed straight
back, so a buffer kept here would save no allocation and add state.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

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


def keep_mask(scores: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor, offset: int = 0,
              check_finite: bool = False) -> torch.Tensor:
    """Bool mask ``s > thr or (s == thr and offset + flat_index < cut)`` in one pass, which with
    ``check_finite`` also checks thr and the scores finite (CPU: ValueError; CUDA: device assert)."""
    return _ext.keep_mask(scores, thr, cut, offset, check_finite)


def topk_keep_mask(tensors: Sequence[torch.Tensor], k: int, hint: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """The keep masks of the exact top-k over the concatenation, one per tensor (CPU: written by the
    selection's fused pass when it holds rank k)."""
    return _ext.topk_keep_mask(list(tensors), k, hint)


# ----------------------------------------------------------------------------- masked layers


# Forward and backward of each layer: the composition above, in C++ (csrc/masked_autograd.cpp, which
# also serves the eager path's autograd node, :func:`layer_op`). A backward returns (grad_x,
# grad_weight, grad_bias, grad_scores), None where ``needs`` says a gradient is not wanted.

masked_linear_forward = _ext.masked_linear_forward
masked_linear_backward = _ext.masked_linear_backward
masked_linear_keep_forward = _ext.masked_linear_keep_forward
masked_linear_keep_backward = _ext.masked_linear_keep_backward
masked_conv2d_forward = _ext.masked_conv2d_forward
masked_conv2d_backward = _ext.masked_conv2d_backward
masked_conv2d_keep_forward = _ext.masked_conv2d_keep_forward
masked_conv2d_keep_backward = _ext.masked_conv2d_keep_backward


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
