"""Exact top-k selection on CUDA (csrc/cuda/select*.cu), over the ops shared with "cpp" (:mod:`..native`).

Two algorithms, picked per call by the environment variable ``BISE_SELECT_CUDA``: ``radix``
(the default) and ``bracket`` (one fused pass in the common case, unmeasured on a GPU so far;
docs/select.md). Both take float32, float16, bfloat16 and float64 scores (16-, 32- and 64-bit
keys). Their first pass over the scores asserts on NaN / inf on the device, no launch of its own
(``CHECKS_FINITE``: the API does not read the scores for it); ``keep_mask``'s pass does when
asked (``check_finite``: a module's threshold in "keep" mask mode). ``topk_keep_mask``: the
bracket select writes the masks in its fused pass and over its buffer, the radix select in a
keep_mask pass after it (unmeasured on a GPU). Importing fails with a reason when the extension
was built without its CUDA kernels.
"""

from __future__ import annotations

import torch

from ..._extension import require_cuda_kernels

require_cuda_kernels()

from ..native import batched_topk_select, keep_mask, topk_keep_mask, topk_select  # noqa: E402

__all__ = ["topk_select", "batched_topk_select", "keep_mask", "topk_keep_mask"]
KERNELS = tuple(__all__)
CHECKS_FINITE = ("topk_select", "batched_topk_select", "topk_keep_mask", "keep_mask")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
