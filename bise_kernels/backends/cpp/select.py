"""Exact top-k selection on CPU in C++ (csrc/cpu/select.cpp): sampling bracket + radix select.

The ops take care of non-contiguous inputs, hint dtypes and argument errors; the wrappers are
shared with the "cuda" backend (:mod:`..native`).
"""

from __future__ import annotations

from ..native import batched_topk_select, keep_mask, topk_select

__all__ = ["topk_select", "batched_topk_select", "keep_mask"]
KERNELS = tuple(__all__)
