"""The top-level bise API: every name of __all__ resolves, and the function names beat the submodules."""

import importlib
import inspect

import bise


def test_api_names_are_the_functions_even_after_their_submodules_are_imported():
    for name in ("extract", "evaluate", "export", "finetune", "cli", "report", "subnetwork"):
        importlib.import_module(f"bise.{name}")
    for name in ("extract", "evaluate", "export", "finetune"):
        assert inspect.isfunction(getattr(bise, name)), name
    assert bise.export.__name__ == "export_subnetwork"


def test_every_public_name_resolves():
    assert all(getattr(bise, name) is not None for name in bise.__all__)
    assert inspect.isclass(bise.ExtractConfig) and inspect.isclass(bise.Subnetwork)
