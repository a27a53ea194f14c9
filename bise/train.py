"""Vanilla (ERM) training with the paper's per-dataset recipes (bise-method.md section 8).

The recipe is chosen from the data: two-bias data -> the Multi-Color MNIST MLP recipe;
group-balanced data -> the CelebA recipe; a name containing "corrupt" -> the Corrupted CIFAR-10
recipe; anything else -> the BiasedMNIST recipe. Random augmentation (CelebA flips, CIFAR crops) is
not applied: the built-in data are small images with no augmentation pipeline.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed, validate
from .models import build_model

RECIPES = {
    "biased-mnist": {"arch": "simple-cnn", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                     "epochs": 80, "batch_size": 100, "schedule": "multistep"},
    "multicolor-mnist": {"arch": "mlp", "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "epochs": 100,
                         "batch_size": 256, "schedule": None},
    "celeba": {"arch": "resnet18", "optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-4, "epochs": 50,
               "batch_size": 256, "schedule": None},
    "corrupted-cifar10": {"arch": "resnet18", "optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "epochs": 200,
                          "batch_size": 256, "schedule": "cosine"},
}


def recipe_for(data) -> dict:
    """The paper recipe that matches ``data`` (a copy, safe to edit); see the module docstring."""
    if getattr(data, "num_biases", 1) == 2:
        key = "multicolor-mnist"
    elif getattr(data, "weighting", None) == "group-balanced":
        key = "celeba"
    elif "corrupt" in str(getattr(data, "name", "")).lower():
        key = "corrupted-cifar10"
    else:
        key = "biased-mnist"
    recipe = dict(RECIPES[key], name=key)
    if recipe["schedule"] == "multistep":
        rho = getattr(data, "rho", None)
        recipe["milestones"] = [40, 60] if rho in (0.99, 0.995) else [80, 90]
    return recipe


def _optimizer(params, recipe: dict, lr: float) -> torch.optim.Optimizer:
    if recipe["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=recipe.get("momentum", 0.0), weight_decay=recipe["weight_decay"])
    return torch.optim.Adam(params, lr=lr, weight_decay=recipe["weight_decay"])


def _scheduler(opt, recipe: dict, epochs: int):
    if recipe.get("schedule") == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, recipe["milestones"], 0.1)
    if recipe.get("schedule") == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs))
    return None


def train_epoch(model: nn.Module, split, opt: torch.optim.Optimizer, generator: torch.Generator, batch_size: int,
                device, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """One epoch of ``opt`` steps on shuffled batches; returns the mean loss per sample.

    ``loss_fn(logits, idx)`` is the mean loss of the batch ``idx``. In a multi-process run every
    rank takes its share of the same global batches and gradients are summed over ranks, so the
    steps equal those of one process with the global batch (BatchNorm statistics stay per rank).
    """
    ctx = distributed.current()
    params = [p for group in opt.param_groups for p in group["params"]]
    total = torch.zeros((), dtype=torch.float64, device=device)
    for idx, n_global in distributed.local_batches(len(split), batch_size, generator, ctx):
        loss = distributed.scaled(loss_fn(model(split.inputs(idx).to(device)), idx), len(idx), n_global)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.all_reduce_grads(params)
        opt.step()
        total += loss.detach() * n_global
    return float(distributed.all_reduce_sum(total)) / max(len(split), 1)


def fit(model: nn.Module, split, recipe: dict, *, epochs: int, batch_size: int, lr: float, seed: int = 0,
        device="cpu", quiet: bool = False, desc: str = "vanilla") -> nn.Module:
    """Plain ERM on ``split`` (train mode, shuffled batches from a generator seeded by ``seed``)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an int >= 0, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    model.to(device).train()
    opt = _optimizer([p for p in model.parameters() if p.requires_grad], recipe, lr)
    sched = _scheduler(opt, recipe, epochs)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", disable=quiet, leave=False):
        train_epoch(model, split, opt, gen, batch_size, device,
                    lambda logits, idx: F.cross_entropy(logits, split.y[idx].to(device)))
        if sched is not None:
            sched.step()
    return model.eval()


def train_vanilla(data, arch: Optional[str] = None, *, epochs: Optional[int] = None,
                  batch_size: Optional[int] = None, lr: Optional[float] = None, seed: int = 0, device="cpu",
                  width: float = 1.0, quiet: bool = False, **model_kwargs) -> nn.Module:
    """Build ``arch`` for ``data`` and train it by ERM with the paper recipe (overridable); eval mode."""
    recipe = recipe_for(data)
    epochs = recipe["epochs"] if epochs is None else validate.as_int("epochs", epochs, 0)
    batch_size = recipe["batch_size"] if batch_size is None else validate.as_int("batch_size", batch_size, 1)
    lr = recipe["lr"] if lr is None else validate.as_positive("lr", lr)
    seed, device = validate.as_int("seed", seed, 0), validate.device(device)
    torch.manual_seed(seed)
    model = build_model(arch or recipe["arch"], data.num_classes, data.input_shape, width=width, **model_kwargs)
    return fit(model, data.train, recipe, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device,
               quiet=quiet)


__all__ = ["RECIPES", "fit", "recipe_for", "train_epoch", "train_vanilla"]
