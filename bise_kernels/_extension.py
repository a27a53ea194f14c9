"""Loads the optional compiled extension ``bise_kernels._C`` (C++ CPU kernels, CUDA kernels).

Its ops live in the ``torch.ops.bise_kernels_ext`` namespace (schemas: csrc/library.cpp). Import
failure is reported by the backend registry as one log line; the library keeps working on the
other backends.
"""

from __future__ import annotations

import functools

import torch

NAMESPACE = "bise_kernels_ext"


@functools.lru_cache(maxsize=None)
def ext_ops():
    """``torch.ops.bise_kernels_ext`` after loading ``bise_kernels._C``; ImportError says why not."""
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"the compiled extension bise_kernels._C is not available ({exc}); "
            "rebuild with `pip install --no-build-isolation -e .`"
        ) from exc
    return getattr(torch.ops, NAMESPACE)


def require_cuda_kernels() -> None:
    """ImportError saying why, unless the extension was built with its CUDA kernels (WITH_CUDA)."""
    ext_ops()
    from . import _C

    if not getattr(_C, "WITH_CUDA", False):
        raise ImportError("bise_kernels._C was built without its CUDA kernels (needs a CUDA torch and nvcc)")
