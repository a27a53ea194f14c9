"""Loads the optional compiled extension ``bise_kernels._C`` (C++ CPU kernels, CUDA kernels).

Its ops live in the ``torch.ops.bise_kernels_ext`` namespace (schemas: csrc/library.cpp). Import
failure is reported by the backend registry as one log line; the library keeps working on the
other backends.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

NAMESPACE = "bise_kernels_ext"
SETUP = Path(__file__).resolve().parents[1] / "setup.py"  # there in a source checkout, not in site-packages


def rebuild_hint() -> str:
    """How to rebuild the extension. pip skips a failed build without a word (setup.py), so an installed
    package is reinstalled with BISE_KERNELS_BUILD_CPP=1, which makes the failure an error that says why."""
    if SETUP.is_file():
        return f"rebuild with `BISE_KERNELS_BUILD_CPP=1 pip install --no-build-isolation -e {SETUP.parent}`"
    return ("reinstall with `BISE_KERNELS_BUILD_CPP=1 pip install --no-build-isolation --force-reinstall --no-deps "
            "--no-cache-dir bise-kernels` (against the installed torch; it needs a C++20 compiler with OpenMP; a failed build is then an error that says why)")


@functools.lru_cache(maxsize=None)
def ext_ops():
    """``torch.ops.bise_kernels_ext`` after loading ``bise_kernels._C``; ImportError says why not."""
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:
        what = "was not built" if importlib.util.find_spec(f"{__package__}._C") is None else f"does not load ({exc})"
        raise ImportError(f"the compiled extension bise_kernels._C {what}; {rebuild_hint()}") from exc
    return getattr(torch.ops, NAMESPACE)


def require_cuda_kernels() -> None:
    """ImportError saying why, unless the extension was built with its CUDA kernels (WITH_CUDA)."""
    ext_ops()
    from . import _C

    if not getattr(_C, "WITH_CUDA", False):
        raise ImportError("bise_kernels._C was built without its CUDA kernels (needs a CUDA torch and nvcc)")
