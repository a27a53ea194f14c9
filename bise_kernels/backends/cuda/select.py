"""Exact top-k selection on CUDA (csrc/cuda/select.cu): thin wrappers over bise_kernels_ext ops.

Same algorithm as the Triton backend (backends/triton/select.py); float64 falls back to the
reference. Importing fails with a reason when the extension was built without CUDA kernels.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ... import _extension
from .. import reference

if not _extension.has_cuda_kernels():
    raise ImportError("bise_kernels._C was built without its CUDA kernels (needs a CUDA torch and nvcc)")

_ops = _extension.ext_ops()
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def topk_select(tensors: Sequence[torch.Tensor], k: int, hint: Optional[torch.Tensor] = None):
    """Exact top-k over the virtual concatenation of ``tensors`` (see reference.topk_select)."""
    if tensors[0].dtype not in _DTYPES:
        return reference.topk_select(tensors, k, hint)
    hints = None if hint is None else hint.reshape(1).to(tensors[0].device, tensors[0].dtype)
    thr, cut = _ops.radix_select_cuda(list(tensors), [k], hints, False)
    return thr.reshape(()), cut.reshape(())


def batched_topk_select(tensors: Sequence[torch.Tensor], ks: Sequence[int], hints: Optional[torch.Tensor] = None):
    """One independent top-k per tensor, all in the same launches (see reference.batched_topk_select)."""
    if tensors[0].dtype not in _DTYPES:
        return reference.batched_topk_select(tensors, ks, hints)
    if hints is not None:
        hints = hints.reshape(-1).to(tensors[0].device, tensors[0].dtype)
    return _ops.radix_select_cuda(list(tensors), list(ks), hints, True)


def keep_mask(scores: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Bool mask ``s > thr or (s == thr and offset + flat_index < cut)`` (see reference.keep_mask)."""
    if scores.dtype not in _DTYPES:
        return reference.keep_mask(scores, thr, cut, offset)
    return _ops.keep_mask_cuda(scores, thr, cut, offset)


KERNELS = ("topk_select", "batched_topk_select", "keep_mask")
