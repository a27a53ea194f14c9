"""Masked layers and channel gate on the fused CUDA kernels (csrc/cuda/masked.cu, gate.cu).

The composition (fused mask pass, then cuBLAS/cuDNN through ATen, then a fused score-gradient
pass) is shared with the "cpp" backend: :mod:`..native`. Importing fails with a reason when the
extension was built without its CUDA kernels.
"""

from __future__ import annotations

from ..._extension import require_cuda_kernels

require_cuda_kernels()

from ..native import (channel_gate_backward, channel_gate_forward, masked_conv2d_backward,  # noqa: E402
                      masked_conv2d_forward, masked_conv2d_keep_backward, masked_conv2d_keep_forward,
                      masked_linear_backward, masked_linear_forward, masked_linear_keep_backward,
                      masked_linear_keep_forward)

__all__ = ["masked_linear_forward", "masked_linear_backward", "masked_linear_keep_forward",
           "masked_linear_keep_backward", "masked_conv2d_forward", "masked_conv2d_backward",
           "masked_conv2d_keep_forward", "masked_conv2d_keep_backward",
           "channel_gate_forward", "channel_gate_backward"]
KERNELS = tuple(__all__)
