"""Exact top-k selection on CPU in C++ (csrc/cpu/select.cpp): sampling bracket + radix select.

Thin wrappers with the signatures of the contract in :mod:`..reference`; the C++ ops take
care of non-contiguous inputs, hint dtypes and argument errors. Importing this module fails
(making the "cpp" backend unavailable) when the compiled extension is missing.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..._extension import ext_ops

_ops = ext_ops()


def topk_select(
    tensors: Sequence[torch.Tensor], k: int, hint: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the concatenation of ``tensors`` (never concatenated): ``(thr, cut)``."""
    return _ops.select_topk(list(tensors), k, hint)


def batched_topk_select(
    tensors: Sequence[torch.Tensor], ks: Sequence[int], hints: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One independent top-k per tensor, all in one call: thresholds and cuts of shape (L,)."""
    return _ops.select_batched(list(tensors), list(ks), hints)


def keep_mask(scores: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Bool mask ``s > thr or (s == thr and offset + flat_index < cut)`` in one parallel pass."""
    return _ops.select_keep_mask(scores, thr, cut, offset)


KERNELS = ("topk_select", "batched_topk_select", "keep_mask")
