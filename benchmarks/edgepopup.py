"""The edge-popup reference mask (Ramanujan et al.'s GetSubnet), shared by the CPU and GPU step
benchmarks as the baseline a fused masked layer is measured against."""

from __future__ import annotations

import torch


class EdgePopupSubnet(torch.autograd.Function):
    """Sort the scores, zero the lowest (1 - density), one the rest; straight-through backward."""

    @staticmethod
    def forward(ctx, scores, density):
        out = scores.clone()
        _, idx = scores.flatten().sort()
        j = int((1 - density) * scores.numel())
        flat_out = out.flatten()
        flat_out[idx[:j]] = 0
        flat_out[idx[j:]] = 1
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None
