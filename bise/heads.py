"""Gradients of the auxiliary bias heads on cached features, without building an autograd graph.

The head phases of an extraction (head pre-training and every refit: 550 of the paper's epochs)
train linear heads ``Linear(d, K)`` with ``CE(head(z), b)`` on bottleneck features ``z`` that
do not change within a phase. :func:`set_head_grads` computes each head's weight and bias
gradient with the same ATen kernels that autograd runs for ``F.cross_entropy(F.linear(z, W, c),
b)`` (log-softmax, NLL backward, log-softmax backward, then ``g^T z`` and ``sum(g)``), so the
gradients, and the optimiser steps taken from them, are bit for bit those of the autograd loop
(checked in tests/bise/test_train_batching.py) at a fraction of its per-step host cost.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_MEAN = 1  # at::Reduction::Mean
_IGNORE = -100


@torch.no_grad()
def set_head_grads(heads: Sequence[nn.Linear], z: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """``p.grad`` of every head parameter for ``scale * sum_h CE(heads[h](z), targets[:, h])``.

    ``z``: (B, d) features; ``targets``: (B, H) int64 labels, one column per head; ``scale``: a 0-d
    tensor on z's device (the loss weight, e.g. local / global batch size). Returns the unscaled
    ``sum_h CE`` (summed like Python's ``sum`` of the per-head losses).
    """
    ces = []
    for h, head in enumerate(heads):
        t = targets[:, h]
        logp = torch.log_softmax(F.linear(z, head.weight, head.bias), 1)
        ce, total_weight = torch.ops.aten.nll_loss_forward(logp, t, None, _MEAN, _IGNORE)
        ces.append(ce)
        g = torch.ops.aten.nll_loss_backward(scale, logp, t, None, _MEAN, _IGNORE, total_weight)
        g = torch.ops.aten._log_softmax_backward_data(g, logp, 1, logp.dtype)
        head.weight.grad = g.t().mm(z)
        head.bias.grad = g.sum(0)
    return sum(ces)


__all__ = ["set_head_grads"]
