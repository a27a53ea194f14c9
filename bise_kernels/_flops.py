"""FLOP formulas of the masked layer ops for torch.utils.flop_counter.FlopCounterMode (which counted
0 for them): the dense GEMM or convolution each op runs, as for aten.mm / aten.convolution (a mask
zeroes weights, it does not skip their multiply-adds). The selections, mask passes and the channel
gate are elementwise, which FlopCounterMode does not count for aten ops either. Under the counter (a
dispatch mode) the ops take their custom ops (_ops._plain_eager), forward and backward."""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

OPS = torch.ops.bise_kernels


def _gemm(x_shape, w_shape) -> int:
    """x (..., K) @ W (N, K).T: 2 * M * N * K."""
    return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


def _wants(needs) -> tuple[bool, bool]:
    """(grad_x, grad of W_eff): the weight's and the scores' gradients both come from dL/dW_eff."""
    return bool(needs[0]), bool(needs[1] or needs[3])


@register_flop_formula([OPS.masked_linear, OPS.masked_linear_keep])
def _linear_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _gemm(x_shape, w_shape)


@register_flop_formula([OPS.masked_linear_backward, OPS.masked_linear_keep_backward])
def _linear_backward_flop(grad_y_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return _gemm(x_shape, w_shape) * sum(_wants(args[-1]))


@register_flop_formula([OPS.masked_conv2d, OPS.masked_conv2d_keep])
def _conv_flop(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


@register_flop_formula([OPS.masked_conv2d_backward, OPS.masked_conv2d_keep_backward])
def _conv_backward_flop(grad_y_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """aten.convolution_backward's count (torch's conv_backward_flop, not transposed): grad_x a
    transposed conv of grad_y with W, dL/dW_eff a conv of x with grad_y (channels first)."""
    grad_x, grad_w = _wants(args[-1])
    t = lambda shape: [shape[1], shape[0], *shape[2:]]  # noqa: E731
    return (conv_flop_count(grad_y_shape, w_shape, x_shape, transposed=True) * grad_x
            + conv_flop_count(t(x_shape), t(grad_y_shape), t(w_shape), transposed=False) * grad_w)
