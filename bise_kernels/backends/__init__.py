"""Backend registry: which implementation of each kernel runs for a device.

A backend is a set of modules exporting kernels named as in :mod:`.reference` (the contract).
A module may declare ``DTYPES``, the dtypes its kernels take (of the tensor an op dispatches on:
the scores for selection, x for the layers); without it they take every float dtype. A module may
declare ``CHECKS_FINITE``, the kernels of its that raise on NaN / inf scores themselves (in a
pass they make anyway; ``keep_mask``: when asked, ``check_finite``): the API then skips its own
finiteness check, an extra read (:func:`checks_finite`). Modules
load lazily on first use; a module that fails to import makes the backend unavailable and
records why (one log line). "auto" walks a per-device order and takes the first available
backend that implements the kernel for the dtype, ending at the always-present "torch"
reference. A backend chosen explicitly (``set_backend`` / ``BISE_KERNELS_BACKEND``) that cannot
run on the device raises :class:`BackendUnavailableError` naming why; kernels it does not
implement, or not for the dtype, come from the reference.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Optional

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("bise_kernels")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


@dataclass
class Backend:
    name: str
    devices: tuple[str, ...]
    modules: tuple[str, ...]
    _kernels: Optional[dict[str, Callable]] = field(default=None, repr=False)
    _dtypes: dict[str, tuple[torch.dtype, ...]] = field(default_factory=dict, repr=False)
    _checks_finite: set[str] = field(default_factory=set, repr=False)
    why_unavailable: Optional[str] = None
    import_errors: Optional[str] = None
    """The modules that failed to import and why, also when others did (``python -m bise_kernels``)."""

    def kernels(self) -> dict[str, Callable]:
        """Import the backend's modules once; collect their public kernels."""
        if self._kernels is None:
            found: dict[str, Callable] = {}
            failed: dict[str, list[str]] = {}  # error -> the modules that failed with it (cpp: both, one cause)
            for path in self.modules:
                try:
                    module = importlib.import_module(path)
                except Exception as exc:  # noqa: BLE001 - any import failure disables that module
                    failed.setdefault(f"{type(exc).__name__}: {exc}", []).append(path)
                    continue
                for name in getattr(module, "KERNELS", ()):
                    found[name] = getattr(module, name)
                    if hasattr(module, "DTYPES"):
                        self._dtypes[name] = tuple(module.DTYPES)
                self._checks_finite.update(getattr(module, "CHECKS_FINITE", ()))
            errors = "; ".join(f"{', '.join(paths)}: {error}" for error, paths in failed.items())
            self.import_errors = errors or None
            if failed and not found:
                self.why_unavailable = errors
                logger.warning("bise_kernels: backend %r unavailable (%s)", self.name, errors)
            elif failed:
                logger.warning("bise_kernels: backend %r partly unavailable (%s)", self.name, errors)
            self._kernels = found
        return self._kernels

    def runs_on(self, device_type: str) -> bool:
        return device_type in self.devices and bool(self.kernels())

    def supports(self, kernel: str, dtype: Optional[torch.dtype] = None) -> bool:
        """Whether this backend implements ``kernel`` for tensors of ``dtype`` (None: for some dtype)."""
        if kernel not in self.kernels():
            return False
        return dtype is None or kernel not in self._dtypes or dtype in self._dtypes[kernel]


# checks_finite's answers: (backend now, kernel, device type, dtype) -> bool.
_FINITE_ANSWERS: dict[tuple, bool] = {}


class _Table(dict):
    """A registry table (backends, "auto" orders, compositions): any write clears the answers of
    :func:`checks_finite`, which the tables decide (tests register backends and orders)."""


def _forgetting(write: Callable) -> Callable:
    def method(self, *args, **kwargs):
        _FINITE_ANSWERS.clear()
        return write(self, *args, **kwargs)

    return method


for _write in ("__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem", "setdefault", "update"):
    setattr(_Table, _write, _forgetting(getattr(dict, _write)))


def _triton_devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if INTERPRET else ("cuda",)


DEVICE_NOTES = {"triton": " (CPU tensors too under TRITON_INTERPRET=1, set before import: the interpreter, for tests)"}
"""Said after a backend's devices when it is asked for another."""


BACKENDS: dict[str, Backend] = _Table({
    "torch": Backend("torch", ("cpu", "cuda", "mps", "xpu", "meta"), ("bise_kernels.backends.reference",)),
    "cpp": Backend("cpp", ("cpu",), ("bise_kernels.backends.cpp.select", "bise_kernels.backends.cpp.masked")),
    "cuda": Backend("cuda", ("cuda",), ("bise_kernels.backends.cuda.select", "bise_kernels.backends.cuda.masked")),
    "triton": Backend(
        "triton",
        _triton_devices(),
        (
            "bise_kernels.backends.triton.select",
            "bise_kernels.backends.triton.masked_linear",
            "bise_kernels.backends.triton.masked_conv",
            "bise_kernels.backends.triton.channel_gate",
        ),
    ),
})

# "auto" order per device: the native kernels, then Triton, then the reference. On the CPU "cpp" was
# measured against torch's own ops (docs/select.md, docs/masked_cpu.md); the CUDA order is a default,
# not a measurement. The per-kernel entries below override it, each citing what was measured.
AUTO_ORDER: dict[str, tuple[str, ...]] = _Table({
    "cpu": ("cpp", "torch"),
    "cuda": ("cuda", "triton", "torch"),
})
# Masked layers on CUDA: "cuda" (one fused W_eff pass, then cuBLAS/cuDNN). The Triton masked GEMM
# and conv are slower than materialising W_eff then calling cuBLAS/cuDNN on an H200
# (benchmarks/results/nvidia-h200-20261130-f94c1afe-masked-bf16.json: masked_linear 0.73-0.86x
# "materialise_then_cublas", masked conv 0.12-0.30x cuDNN), so no entry puts Triton first for them.
AUTO_ORDER_PER_KERNEL: dict[tuple[str, str], tuple[str, ...]] = _Table({
    # The Triton select took 4317 us for 25M fp32 scores where torch.sort took 1182 us (0.27x) and the
    # CUDA select 334 us on one H200 (benchmarks/results/nvidia-h200-20261130-f94c1afe-select.json):
    # on CUDA "auto" skips it; it stays selectable by name ("triton").
    **{("cuda", kernel): ("cuda", "torch") for kernel in ("topk_select", "batched_topk_select", "keep_mask")},
})

ENV_VARIABLE = "BISE_KERNELS_BACKEND"
"""The environment variable naming the initial backend (default "auto"), read at the first op."""


class _State(threading.local):
    """The backend that use_backend chose in this thread; None: the process-wide one. A class
    default: reading it costs 0.04 us where getattr(local, "name", default) of an unset name
    raised and caught an AttributeError, 0.35 us, a few times per op (timeit, one thread)."""

    name: Optional[str] = None


_state = _State()
_default: Optional[str] = None


def _current() -> str:
    global _default
    if _default is None:
        _default = _validate_name(os.environ.get(ENV_VARIABLE) or "auto", ENV_VARIABLE)  # set but empty: "auto"
    return _state.name or _default


def _validate_name(name: object, what: str = "backend") -> str:
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"{what} must be one of {['auto', *BACKENDS]}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for all kernels ("auto" picks the fastest available per device)."""
    global _default
    _default = _validate_name(name)
    _state.name = None


def get_backend() -> str:
    return _current()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily select a backend in this thread."""
    previous = _state.name
    _state.name = _validate_name(name)
    try:
        yield
    finally:
        _state.name = previous


def present_devices() -> tuple[str, ...]:
    """Device types usable in this process."""
    import torch

    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def available_backends(device_type: Optional[str] = None) -> list[str]:
    """Backends that can run here: on ``device_type`` if given, else on any present device."""
    devices = (device_type,) if device_type is not None else present_devices()
    return [name for name, backend in BACKENDS.items() if any(backend.runs_on(d) for d in devices)]


def why_unavailable(name: str) -> Optional[str]:
    backend = BACKENDS[_validate_name(name)]
    backend.kernels()
    return backend.why_unavailable


def resolve(kernel: str, device_type: str, dtype: Optional[torch.dtype] = None) -> tuple[str, Callable]:
    """The (backend name, function) that runs ``kernel`` on ``device_type`` tensors of ``dtype`` now."""
    name = _current()
    if name != "auto":
        backend = BACKENDS[name]
        if device_type not in backend.devices:
            raise BackendUnavailableError(f"backend {name!r} does not run on {device_type!r} tensors; it runs on "
                                          f"{backend.devices}{DEVICE_NOTES.get(name, '')}")
        kernels = backend.kernels()
        if not kernels:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: {backend.why_unavailable}")
        if backend.supports(kernel, dtype):
            return name, kernels[kernel]
        return "torch", BACKENDS["torch"].kernels()[kernel]
    order = AUTO_ORDER_PER_KERNEL.get((device_type, kernel), AUTO_ORDER.get(device_type, ("torch",)))
    for candidate in order:
        backend = BACKENDS[candidate]
        if backend.runs_on(device_type) and backend.supports(kernel, dtype):
            return candidate, backend.kernels()[kernel]
    return "torch", BACKENDS["torch"].kernels()[kernel]


# Kernels that bise_kernels/_ops.py composes from the backend's own where the backend lacks them;
# the first pass over the scores is then the named kernel's.
COMPOSED_OF = _Table({"topk_keep_mask": "topk_select"})


def checks_finite(kernel: str, device_type: str, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the ``kernel`` that :func:`resolve` picks now (or the one it is composed of, where
    only the reference has it) raises on NaN / inf scores itself. Asked on every public select
    call, so cached per (backend now, kernel, device type, dtype): set_backend / use_backend change
    the first, a write to a registry table clears the cache, and a backend's kernels are fixed once
    loaded. Saves 1-2 :func:`resolve` calls per select: 0.5 us of the 26 us of a public
    topk_select of 4096 CPU scores (one thread, interleaved timeit)."""
    key = (_current(), kernel, device_type, dtype)
    answer = _FINITE_ANSWERS.get(key)
    if answer is None:
        answer = _FINITE_ANSWERS[key] = _decide_checks_finite(kernel, device_type, dtype)
    return answer


def _decide_checks_finite(kernel: str, device_type: str, dtype: Optional[torch.dtype]) -> bool:
    name, _ = resolve(kernel, device_type, dtype)
    if name == "torch" and kernel in COMPOSED_OF:
        kernel = COMPOSED_OF[kernel]
        name, _ = resolve(kernel, device_type, dtype)
    return kernel in BACKENDS[name]._checks_finite


def kernel_table(name: str) -> dict[str, Callable]:
    """All kernels of one backend (for tests and benchmarks that call a backend directly)."""
    backend = BACKENDS[_validate_name(name)]
    kernels = backend.kernels()
    if not kernels:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {backend.why_unavailable}")
    return kernels
