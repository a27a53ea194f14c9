"""What bise needs beyond torch: pyproject.toml's ``[bise]`` extra, by the names its packages import as
(Pillow is ``PIL``, torch-pruning ``torch_pruning``), and the one line that says how to install it."""

from __future__ import annotations

MODULES = ("numpy", "tqdm", "matplotlib", "PIL", "torch_pruning")
INSTALL = 'pip install "bise-kernels[bise]"'


def missing(exc: ImportError) -> ModuleNotFoundError | None:
    """The error to raise instead of ``exc`` when it is a module of the extra that failed to import."""
    name = getattr(exc, "name", None) or ""
    if name.partition(".")[0] not in MODULES:
        return None
    return ModuleNotFoundError(f"bise needs {name}, from the [bise] extra: {INSTALL}", name=name)
