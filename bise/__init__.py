"""BISE: unbiased subnetworks inside biased models, on top of bise_kernels.

    import bise
    data = bise.load_data("colored-digits")
    model = bise.train_vanilla(data, "simple-cnn")
    sub = bise.extract(model, data)            # a Subnetwork: .masks, .evaluate(), .export(), .finetune()
    bise.evaluate(model, data.test)            # METRICS: accuracy, aligned / conflicting / unbiased / worst group
    small = sub.export(data.train.inputs()[:64])

Names resolve on first use, so ``import bise`` stays cheap. ``bise.extract``, ``bise.evaluate``,
``bise.export`` and ``bise.finetune`` are the functions even though submodules of the same names
exist (import those with ``from bise.extract import ...``). The losses are in ``bise.losses``.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

_API = {
    "load_data": ("bise.data", "load"),
    "train_vanilla": ("bise.train", "train_vanilla"),
    "build_model": ("bise.models", "build_model"),
    "insert_gates": ("bise.gates", "insert_gates"),
    "extract": ("bise.extract", "extract"),
    "ExtractConfig": ("bise.extract", "ExtractConfig"),
    "Subnetwork": ("bise.subnetwork", "Subnetwork"),
    "evaluate": ("bise.evaluate", "evaluate"),
    "export": ("bise.export", "export_subnetwork"),
    "load_exported": ("bise.export", "load_exported"),
    "finetune": ("bise.finetune", "finetune"),
}
_SUBMODULES = ("checkpoint", "cli", "data", "evaluate", "export", "extract", "finetune", "flops", "gates", "losses",
               "models", "report", "subnetwork", "train")
__all__ = sorted(_API)


def _resolve(name: str):
    module, attr = _API[name]
    return getattr(importlib.import_module(module), attr)


class _Bise(types.ModuleType):
    """Module type whose API names win over same-named submodules that the import system binds."""

    def __getattr__(self, name: str):
        if name in _API:
            return _resolve(name)
        if name in _SUBMODULES:
            return importlib.import_module(f"bise.{name}")
        raise AttributeError(f"module 'bise' has no attribute {name!r}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_API) | set(_SUBMODULES))


def _api_property(name: str) -> property:
    # Importing bise.extract binds the submodule as attribute "extract"; the setter ignores that.
    return property(lambda self: _resolve(name), lambda self, value: None)


for _name in ("extract", "evaluate", "export", "finetune"):
    setattr(_Bise, _name, _api_property(_name))
sys.modules[__name__].__class__ = _Bise
del _name
