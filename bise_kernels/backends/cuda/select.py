"""Exact top-k selection on CUDA (csrc/cuda/select.cu), over the ops shared with "cpp" (:mod:`..native`).

The CUDA radix select works on 16- and 32-bit keys: float64 scores go to the reference.
Importing fails with a reason when the extension was built without its CUDA kernels.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..._extension import require_cuda_kernels
from .. import reference

require_cuda_kernels()

from .. import native  # noqa: E402


def topk_select(tensors: Sequence[torch.Tensor], k: int, hint: Optional[torch.Tensor] = None):
    """Exact top-k over the virtual concatenation of ``tensors`` (see reference.topk_select)."""
    if tensors[0].dtype == torch.float64:
        return reference.topk_select(tensors, k, hint)
    return native.topk_select(tensors, k, hint)


def batched_topk_select(tensors: Sequence[torch.Tensor], ks: Sequence[int], hints: Optional[torch.Tensor] = None):
    """One independent top-k per tensor, all in the same launches (see reference.batched_topk_select)."""
    if tensors[0].dtype == torch.float64:
        return reference.batched_topk_select(tensors, ks, hints)
    return native.batched_topk_select(tensors, ks, hints)


def keep_mask(scores: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Bool mask ``s > thr or (s == thr and offset + flat_index < cut)`` (see reference.keep_mask)."""
    if scores.dtype == torch.float64:
        return reference.keep_mask(scores, thr, cut, offset)
    return native.keep_mask(scores, thr, cut, offset)


KERNELS = ("topk_select", "batched_topk_select", "keep_mask")
