"""The masked weight a user writes by hand in plain PyTorch, shared by the CPU and GPU benchmarks as
the strongest baseline of the fused masked layers: a top-k (or threshold) mask of the scores, then
``W * (mask + s - s.detach())`` (the straight-through estimator) and the dense op. It computes the
gradients bise_kernels computes where the scores hold no ties (the benchmarks check this)."""

from __future__ import annotations

import torch


def top_k_threshold(scores: torch.Tensor, density: float) -> torch.Tensor:
    """The k-th largest score, k = max(1, round(density * n)) as bise_kernels counts it (``torch.kthvalue``)."""
    d = scores.detach().flatten()
    k = max(1, round(density * d.numel()))
    return d.kthvalue(d.numel() - k + 1).values


def keep_mask(scores: torch.Tensor, threshold, dtype: torch.dtype) -> torch.Tensor:
    """``scores >= threshold`` as a ``dtype`` tensor (no gradient)."""
    return (scores.detach() >= threshold).to(dtype)


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight * mask`` whose gradient reaches the scores straight through (d/ds = grad * weight)."""
    return weight * (mask + scores - scores.detach())
