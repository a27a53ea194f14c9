"""Builds the optional extension bise_kernels._C against the installed torch.

* CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp): always, unless BISE_KERNELS_BUILD_CPP=0.
* CUDA kernels (csrc/cuda/*.cu, csrc/cuda/*.cpp): when torch is a CUDA build and nvcc is found
  (CUDA_HOME), or forced with BISE_KERNELS_BUILD_CUDA=1; BISE_KERNELS_BUILD_CUDA=0 disables them.
  TORCH_CUDA_ARCH_LIST defaults to 9.0 when no GPU is visible.
* A failed build is not fatal unless forced (BISE_KERNELS_BUILD_CPP=1 / BISE_KERNELS_BUILD_CUDA=1):
  the library then runs on its other backends.
"""

import glob
import os
import sys

import setuptools
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> str:
    value = os.environ.get(name, "auto").lower()
    if value not in ("0", "1", "auto"):
        sys.exit(f"{name} must be 0, 1 or auto, got {value!r}")
    return value


def _sources(*patterns):
    return sorted(os.path.relpath(p, ROOT) for pattern in patterns for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions():
    build_cpp, build_cuda = _flag("BISE_KERNELS_BUILD_CPP"), _flag("BISE_KERNELS_BUILD_CUDA")
    if build_cpp == "0":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    # -fno-trapping-math: no FP-exception flags are read, and without it gcc 12 vectorises none of the
    # compare-then-multiply loops of the fused masked passes (csrc/cpu/masked.cpp, -fopt-info-vec).
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
    sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    want_cuda = build_cuda == "1" or (build_cuda == "auto" and torch.version.cuda and cpp_extension.CUDA_HOME)
    cpu_ext = cpp_extension.CppExtension("bise_kernels._C", sources, extra_compile_args={"cxx": list(cxx)},
                                         extra_link_args=["-fopenmp"])
    if want_cuda:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext = cpp_extension.CUDAExtension(
            "bise_kernels._C",
            sources + _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp"),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpu_ext
    forced = build_cpp == "1" or build_cuda == "1"

    class BuildExtension(cpp_extension.BuildExtension):
        def build_extensions(self):
            # torch checks the compiler (and nvcc's version against torch's CUDA) here, before any
            # build_extension: a failure there stopped the install. Not fatal unless forced; where the
            # CUDA build was only "auto", the CPU kernels are built instead. A failed extension leaves
            # self.extensions (an --inplace build copies what is listed there).
            self.failed = []
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - the extension is optional unless forced
                if forced:
                    raise
                if self.extensions != [cpu_ext]:
                    print(f"bise_kernels: the CUDA build of bise_kernels._C cannot start ({exc}); building its CPU "
                          "kernels only", file=sys.stderr)
                    self.extensions = [cpu_ext]
                    self.build_extensions()
                    return
                self._skip(exc)
                self.extensions = []
                return
            self.extensions = [e for e in self.extensions if e.name not in self.failed]

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # noqa: BLE001 - the extension is optional unless forced
                if forced:
                    raise
                self.failed.append(extension.name)
                self._skip(exc)

        @staticmethod
        def _skip(exc):
            print(f"bise_kernels: building bise_kernels._C failed ({exc}); the library will run on its other "
                  "backends", file=sys.stderr)

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


# The licence: an SPDX expression from setuptools 77 on (which deprecates pyproject's `license = {text = ...}`
# table, due to fail after 2027-02-18), plain text before 77, which rejects the expression: builds without
# isolation use whatever setuptools is there (a venv from `python3.11 -m venv` with torch 2.11 has 66).
SPDX = int(setuptools.__version__.split(".")[0]) >= 77
LICENSE = {"license_expression" if SPDX else "license": "Apache-2.0"}

ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, **LICENSE)
