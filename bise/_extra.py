"""What bise needs beyond torch: pyproject.toml's ``[bise]`` extra, by the names its packages import as
(Pillow is ``PIL``, torch-pruning ``torch_pruning``), and the one line that says how to install it."""

from __future__ import annotations

import os
import sys

PACKAGES = {"numpy": "numpy", "tqdm": "tqdm", "matplotlib": "matplotlib", "PIL": "Pillow",
            "torch_pruning": "torch-pruning"}  # import name -> package name, in pyproject.toml's order
MODULES = tuple(PACKAGES)
INSTALL = 'pip install "bise-kernels[bise]"'


def missing(exc: ImportError) -> ModuleNotFoundError | None:
    """The error to raise instead of ``exc`` when it is a module of the extra that failed to import."""
    name = getattr(exc, "name", None) or ""
    top = name.partition(".")[0]
    package = PACKAGES.get(top)
    if package is None:
        return None
    module = "" if top == package else f" (module {top})"
    return ModuleNotFoundError(f"bise needs {package}{module}, from the [bise] extra: {INSTALL}", name=name)


def _is_command() -> bool:
    """Whether this process is the ``bise`` command: its console script (``sys.argv[0]``, with the suffixes
    of pip's Windows launchers), or ``python -m bise``, whose package is imported while ``sys.argv[0]`` is
    still "-m" (the interpreter's own arguments, up to the module, precede ``sys.argv[1:]``)."""
    first = os.path.basename(sys.argv[0]) if sys.argv else ""
    if first == "-m":
        head = sys.orig_argv[:len(sys.orig_argv) - len(sys.argv) + 1]
        return bool(head) and head[-1] in ("bise", "-mbise")
    return first.removesuffix(".exe").removesuffix("-script.py").removesuffix("-script.pyw") == "bise"


def exit_if_command(error: ModuleNotFoundError) -> None:
    """In the ``bise`` command, print ``error`` (see :func:`missing`) as one line and exit with status 2, as
    its other errors do (a traceback, before the command could run at all, was all it printed); elsewhere
    return (``import bise`` raises it)."""
    if _is_command():
        print(f"bise: error: {error}", file=sys.stderr)
        raise SystemExit(2)
