"""Vanilla (ERM) training recipes, chosen by architecture and data together (docs/method.md).

* mlp: Adam 1e-3, weight decay 1e-4, batch 256, 100 epochs, whatever the data (LfF and the
  official Multi-Color MNIST code train this MLP so; SGD 0.1 kills most of its ReLUs).
* simple-cnn: the BiasedMNIST recipe (SGD 0.1, momentum 0.9, weight decay 1e-4, batch 100,
  80 epochs, x0.1 at epochs 40 and 60 for rho in {0.99, 0.995}, else at 80 and 90).
* resnet18: the CelebA recipe (Adam 1e-4, 50 epochs) on group-balanced data, else the Corrupted
  CIFAR-10 recipe (Adam 1e-3, 200 epochs, cosine schedule); both weight decay 1e-4, batch 256.
* any other architecture: the default, Adam 1e-3, weight decay 1e-4, batch 256, 30 epochs.

With no architecture given, the data's paper architecture is used: the MLP for two-bias data,
ResNet-18 for group-balanced data, SimpleConvNet otherwise. Nothing depends on a file or
dataset name. Random augmentation (CelebA flips, CIFAR crops) is not applied.
"""

from __future__ import annotations

from typing import Union

from torch import nn

RECIPES = {
    "mlp": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "epochs": 100, "batch_size": 256,
            "schedule": None},
    "simple-cnn": {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "epochs": 80,
                   "batch_size": 100, "schedule": "multistep"},
    "resnet18-group-balanced": {"optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-4, "epochs": 50,
                                "batch_size": 256, "schedule": None},
    "resnet18": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "epochs": 200, "batch_size": 256,
                 "schedule": "cosine"},
    "default": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "epochs": 30, "batch_size": 256,
                "schedule": None},
}


def default_arch(data) -> str:
    """The paper's architecture for data of this kind (see the module docstring)."""
    if getattr(data, "num_biases", 1) == 2:
        return "mlp"
    if getattr(data, "weighting", None) == "group-balanced":
        return "resnet18"
    return "simple-cnn"


def arch_of(arch: Union[str, nn.Module, None], data) -> str:
    """The architecture name: ``arch`` itself, a built-in model's recorded one, or the data's default."""
    if arch is None:
        return default_arch(data)
    if isinstance(arch, nn.Module):
        return getattr(arch, "bise_spec", {}).get("arch", "custom")
    if not isinstance(arch, str):
        raise TypeError(f"arch must be an architecture name, a model or None, got {type(arch).__name__}")
    return arch


def recipe_for(data, arch: Union[str, nn.Module, None] = None) -> dict:
    """The vanilla recipe for ``arch`` (a name, a model, or None: the data's default) on ``data``.

    A fresh dict (safe to edit) with ``name`` (the RECIPES key) and ``arch``.
    """
    arch = arch_of(arch, data)
    if arch == "resnet18":
        key = "resnet18-group-balanced" if getattr(data, "weighting", None) == "group-balanced" else "resnet18"
    elif arch in RECIPES:
        key = arch
    else:
        key = "default"
    recipe = dict(RECIPES[key], name=key, arch=arch)
    if recipe["schedule"] == "multistep":
        recipe["milestones"] = [40, 60] if getattr(data, "rho", None) in (0.99, 0.995) else [80, 90]
    return recipe


__all__ = ["RECIPES", "arch_of", "default_arch", "recipe_for"]
