"""What a bug report needs: versions, the compiled extension, each backend (available or why not)
and which backend runs every kernel now, per device type and dtype. ``python -m bise_kernels``
prints it (``--json``: the same dict as JSON).

:func:`collect` never raises: a probe that fails (no CUDA, no Triton, a bad BISE_KERNELS_BACKEND)
is reported as its error text, a string starting with ``"error: "``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from typing import Any, Callable, Optional

import torch

import bise_kernels

from . import _extension, backends

ENVIRONMENT = {
    backends.ENV_VARIABLE: "the initial backend (default auto), read at the first op",
    "TRITON_INTERPRET": "1: Triton kernels run in the interpreter, on CPU tensors too (read at import)",
    "BISE_KERNELS_AUTOTUNE": "0: one heuristic GEMM tile per shape bucket instead of autotuning (Triton)",
    "BISE_SELECT_CUDA": "the CUDA select algorithm, radix (default) or bracket, read at every call",
    "BISE_COMMIT": "the commit that benchmark and result files record, where git cannot tell (a copy of the tree)",
    "ATEN_CPU_CAPABILITY": "torch's; avx2 / default: its CPU kernels and the cpp select's scans below AVX-512 / AVX2",
}
"""The environment variables that bise_kernels reads (tests/kernels/test_info.py checks the list), and torch's
ATEN_CPU_CAPABILITY, which also sets the instruction set of the cpp select (docs/select.md)."""

DTYPES = ("float32", "float16", "bfloat16", "float64")
"""The dtypes the resolution is asked for: a backend may declare fewer (the registry's ``DTYPES``)."""

ERROR = "error: "


def _error(exc: BaseException) -> str:
    return f"{ERROR}{type(exc).__name__}: {exc}"


def _probe(fn: Callable[[], Any]) -> Any:
    """fn(), or its exception as an error string."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - every failure is a finding to report
        return _error(exc)


def _gpus() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        gpus.append({"index": index, "name": properties.name, "capability": f"{properties.major}.{properties.minor}",
                     "memory_gib": round(properties.total_memory / 2**30, 1)})
    return gpus


def cpu_description() -> str:
    """The CPU model (/proc/cpuinfo; else the platform's name) and the vector ISA of torch's CPU kernels:
    matrix products round differently on another CPU kind, so float results repeat bit for bit on one kind."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({_probe(torch.backends.cpu.get_cpu_capability)})"


def source_commit() -> dict[str, Any]:
    """The commit of this code, for benchmark and result files: ``{"commit": short hash, "dirty": tracked files
    changed}``. $BISE_COMMIT first (the device's copy of the tree sits in no git repository), else git, but only
    where bise_kernels lies at the top of a checkout (not a package installed into a venv inside some other
    repository); else ``{"commit": "unknown", "dirty": None}``."""
    if os.environ.get("BISE_COMMIT"):
        return {"commit": os.environ["BISE_COMMIT"], "dirty": None}
    root = os.path.dirname(os.path.dirname(os.path.abspath(bise_kernels.__file__)))

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if os.path.realpath(git("rev-parse", "--show-toplevel")) != os.path.realpath(root):
            return {"commit": "unknown", "dirty": None}
        return {"commit": git("rev-parse", "--short", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}


def _versions() -> dict[str, Any]:
    return {
        "bise_kernels": bise_kernels.__version__,
        "bise_kernels_path": os.path.dirname(os.path.abspath(bise_kernels.__file__)),
        "bise_kernels_commit": _probe(source_commit),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "cudnn": _probe(torch.backends.cudnn.version),
        "triton": _probe(lambda: importlib.import_module("triton").__version__),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_description(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpus": _probe(_gpus),
    }


def _extension_info() -> dict[str, Any]:
    spec = importlib.util.find_spec("bise_kernels._C")
    found = {"file": spec.origin if spec else None, "loaded": False, "error": None, "with_cuda": None, "hint": None}
    try:
        _extension.ext_ops()
    except Exception as exc:  # noqa: BLE001 - the message says why and how to rebuild
        found["error"] = _error(exc)
        found["hint"] = _probe(_extension.rebuild_hint)
        return found
    from . import _C

    found["loaded"] = True
    found["with_cuda"] = bool(getattr(_C, "WITH_CUDA", False))
    return found


def _backends(devices: tuple[str, ...]) -> dict[str, Any]:
    found = {}
    for name, backend in backends.BACKENDS.items():
        try:
            why = backends.why_unavailable(name)
            here = [device for device in devices if backend.runs_on(device)]
            kernels = sorted(backend.kernels())
        except Exception as exc:  # noqa: BLE001 - reported, as every probe
            why, here, kernels = _error(exc), [], []
        if why is None and not here:
            why = (f"runs on {', '.join(backend.devices)}{backends.DEVICE_NOTES.get(name, '')}; "
                   f"present here: {', '.join(devices)}")
        found[name] = {"available": why is None, "why_unavailable": why, "devices": list(backend.devices),
                       "runs_here_on": here, "kernels": kernels, "import_errors": backend.import_errors}
    return found


def _runs(kernel: str, device: str, dtype: torch.dtype) -> str:
    """The backend that runs ``kernel`` now; where the reference composes it from another kernel
    (``backends.COMPOSED_OF``: _ops.py does so for a backend without it), also who runs that one."""
    name = backends.resolve(kernel, device, dtype)[0]
    part = backends.COMPOSED_OF.get(kernel)
    if name == "torch" and part is not None:
        part_name = backends.resolve(part, device, dtype)[0]
        if part_name != "torch":
            return f"torch (composed: {part} on {part_name})"
    return name


def _resolution(devices: tuple[str, ...]) -> dict[str, Any]:
    """device type -> kernel -> dtype -> the backend that :func:`~.backends.resolve` picks now."""
    kernels = backends.kernel_table("torch")  # the reference implements every kernel of the contract
    return {device: {kernel: {dtype: _probe(lambda: _runs(kernel, device, getattr(torch, dtype))) for dtype in DTYPES}
                     for kernel in kernels}
            for device in devices}


def collect() -> dict[str, Any]:
    """Everything ``python -m bise_kernels`` prints, as a plain dict of JSON types. Never raises."""
    devices = _probe(backends.present_devices)
    if isinstance(devices, str):  # torch.cuda failed: the CPU is still there
        devices = ("cpu",)
    return {
        "versions": _probe(_versions),
        "extension": _probe(_extension_info),
        "backends": _probe(lambda: _backends(devices)),
        "backend_setting": _probe(backends.get_backend),
        "triton_interpreter": backends.INTERPRET,
        "environment": {name: os.environ.get(name) for name in ENVIRONMENT},
        "devices": list(devices),
        "resolution": _probe(lambda: _resolution(devices)),
    }


def _cell(by_dtype: dict[str, str], errors: list[str]) -> str:
    """One table cell: the float32 backend, then the dtypes that differ ("triton (float64: torch)")."""

    def short(value: str) -> str:
        if value.startswith(ERROR):
            if value not in errors:
                errors.append(value)
            return f"error [{errors.index(value) + 1}]"
        return value

    main = by_dtype[DTYPES[0]]
    others = [f"{dtype}: {short(value)}" for dtype, value in by_dtype.items() if value != main]
    return short(main) + (f" ({', '.join(others)})" if others else "")


def format_text(info: dict[str, Any]) -> str:
    """The report as lines of text (sections: versions, extension, backends, setting, kernels)."""
    lines = []
    versions = info["versions"]
    if isinstance(versions, dict):
        gpus, commit = versions["gpus"], versions["bise_kernels_commit"]
        if isinstance(commit, dict):
            commit = commit["commit"] + (", with uncommitted changes" if commit["dirty"] else "")
        lines += [
            f"bise_kernels {versions['bise_kernels']} ({versions['bise_kernels_path']}, commit {commit})",
            f"torch {versions['torch']} (CUDA {versions['torch_cuda']}, HIP {versions['torch_hip']}, "
            f"cuDNN {versions['cudnn']}), triton {versions['triton']}",
            f"Python {versions['python']}, {versions['platform']}, {versions['cpu']}, {versions['cpu_count']} CPUs "
            f"(torch threads {versions['torch_threads']})",
            "GPUs: " + (gpus if isinstance(gpus, str) else
                        "; ".join(f"{g['index']}: {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)"
                                  for g in gpus) or "none"),
        ]
    else:
        lines.append(f"versions: {versions}")

    extension = info["extension"]
    lines.append("")
    if isinstance(extension, dict):
        state = (f"loaded, {'with' if extension['with_cuda'] else 'without'} its CUDA kernels" if extension["loaded"]
                 else f"NOT loaded: {extension['error']}")
        package = versions.get("bise_kernels_path") if isinstance(versions, dict) else None
        elsewhere = extension["file"] and package and os.path.dirname(extension["file"]) != package
        # an editable install's finder can map _C to another checkout's build (seen: a git worktree)
        lines += [f"extension bise_kernels._C: {state}",
                  f"  file: {extension['file']}" + (" (NOT in the package directory above)" if elsewhere else "")]
    else:
        lines.append(f"extension bise_kernels._C: {extension}")

    lines += ["", "backends:"]
    if isinstance(info["backends"], dict):
        width = max(map(len, info["backends"]))
        for name, backend in info["backends"].items():
            state = (f"available on {', '.join(backend['runs_here_on'])}" if backend["available"]
                     else f"unavailable: {backend['why_unavailable']}")
            lines.append(f"  {name:<{width}}  {state}")
            if backend["available"] and backend["import_errors"]:
                lines.append(f"  {'':<{width}}  partly: {backend['import_errors']} "
                             "(the table says who runs those kernels)")
    else:
        lines.append(f"  {info['backends']}")

    lines += ["", f"backend setting: {info['backend_setting']} (set_backend / use_backend / BISE_KERNELS_BACKEND)",
              f"Triton interpreter: {'on' if info['triton_interpreter'] else 'off'}", "environment:"]
    settings = [(f"{name}={value}" if value is not None else f"{name} unset", ENVIRONMENT.get(name, ""))
                for name, value in info["environment"].items()]
    width = max(len(setting) for setting, _ in settings)
    lines += [f"  {setting:<{width}}  # {what}" for setting, what in settings]

    resolution = info["resolution"]
    lines += ["", f"which backend runs each kernel now ({', '.join(DTYPES)} unless a dtype is named):"]
    if isinstance(resolution, dict):
        errors: list[str] = []
        devices = list(resolution)
        kernels = list(next(iter(resolution.values()), {}))
        rows = [["kernel", *devices]] + [[kernel, *(_cell(resolution[d][kernel], errors) for d in devices)]
                                         for kernel in kernels]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines += [f"  [{i}] {error[len(ERROR):]}" for i, error in enumerate(errors, 1)]
    else:
        lines.append(f"  {resolution}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m bise_kernels`` (tests/test_docs.py parses the docs' command lines with it)."""
    parser = argparse.ArgumentParser(
        prog="python -m bise_kernels",
        description="The diagnostics for a bug report: versions, the extension, each backend (available or why not), "
                    "which backend runs each kernel.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_text(info))
    return 0
