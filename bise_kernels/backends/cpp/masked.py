"""Masked layers and channel gate on the fused C++ CPU kernels (csrc/cpu/masked.cpp, gate.cpp).

The composition (fused mask pass, dense ATen GEMM/conv, fused score-gradient pass) is shared with
the "cuda" backend: :mod:`..native`.
"""

from __future__ import annotations

from ..native import (channel_gate_backward, channel_gate_forward, masked_conv2d_backward, masked_conv2d_forward,
                      masked_conv2d_keep_backward, masked_conv2d_keep_forward, masked_linear_backward,
                      masked_linear_forward, masked_linear_keep_backward, masked_linear_keep_forward)

__all__ = ["masked_linear_forward", "masked_linear_backward", "masked_linear_keep_forward",
           "masked_linear_keep_backward", "masked_conv2d_forward", "masked_conv2d_backward",
           "masked_conv2d_keep_forward", "masked_conv2d_keep_backward",
           "channel_gate_forward", "channel_gate_backward"]
KERNELS = tuple(__all__)
