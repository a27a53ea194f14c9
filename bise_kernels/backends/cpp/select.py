"""Exact top-k selection on CPU in C++ (csrc/cpu/select.cpp): sampling bracket + radix select.

The ops take care of non-contiguous inputs, hint dtypes and argument errors; the wrappers are
shared with the "cuda" backend (:mod:`..native`). The selects' passes over the scores also check
them for NaN / inf (a ValueError naming the tensor), so the API does not read them once more;
``keep_mask`` does when asked (``check_finite``: a module's threshold in "keep" mask mode).
``topk_keep_mask`` writes the keep masks in the selection's fused pass where that pass holds rank k.
"""

from __future__ import annotations

from ..native import batched_topk_select, keep_mask, topk_keep_mask, topk_select

__all__ = ["topk_select", "batched_topk_select", "keep_mask", "topk_keep_mask"]
KERNELS = tuple(__all__)
CHECKS_FINITE = ("topk_select", "batched_topk_select", "topk_keep_mask", "keep_mask")
