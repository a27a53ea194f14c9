"""Masked layers and channel gate on the fused CUDA kernels (csrc/cuda/masked.cu, gate.cu).

The same composition as the "cpp" backend (fused mask pass, then cuBLAS/cuDNN through ATen, then a
fused score-gradient pass; see :mod:`..cpp.masked`), over the ``<op>_cuda`` ops of the extension.
"""

from __future__ import annotations

from ..._extension import has_cuda_kernels
from ..cpp.masked import FusedMaskedKernels

if not has_cuda_kernels():
    raise ImportError("bise_kernels._C was built without its CUDA kernels (needs a CUDA torch and nvcc)")

_kernels = FusedMaskedKernels(suffix="_cuda")
KERNELS = FusedMaskedKernels.KERNELS
globals().update({name: getattr(_kernels, name) for name in KERNELS})
