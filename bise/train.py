"""Vanilla (ERM) training with the recipe of bise.recipes (chosen by architecture and data together)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import distributed, validate
from .batching import DeviceSplit
from .models import build_model
from .recipes import recipe_for


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


@contextmanager
def seeded(seed: int, device) -> Iterator[None]:
    """Run the block with torch's global RNG seeded by ``seed`` (on the CPU and on ``device`` when it is
    a GPU), then give the caller's RNG state back: weight initialisation and dropout are reproducible
    and a library call does not reseed the caller's RNG. Inside, ``torch.manual_seed(seed)`` as before
    (the same streams, so the same results)."""
    device = torch.device(device)
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        for gpu in gpus:
            with torch.cuda.device(gpu):
                torch.cuda.manual_seed(seed)
        yield


@contextmanager
def rank_streams(seed: int, device) -> Iterator[None]:
    """Random draws of the block (dropout) independent across the ranks of a multi-process run: rank r > 0
    draws from the global RNG seeded by (seed, r) for the block (its state is given back after); rank 0,
    and one process, draw as before, so a one-process run is unchanged. Without it every rank, seeded
    alike for the initialisation, drew the same dropout masks for its share of each global batch."""
    rank = distributed.current().rank
    if rank == 0:
        yield
        return
    with seeded((seed + rank * 0x9E3779B97F4A7C15) % 2**63, device):  # a distinct stream per rank
        yield


def train_epoch(model: nn.Module, split, opt: torch.optim.Optimizer, generator: torch.Generator, batch_size: int,
                device, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """One epoch of ``opt`` steps on shuffled batches; returns the mean loss per sample.

    ``split``: a data split or a :class:`~bise.batching.DeviceSplit` (pass one to keep the data on
    the device across epochs). ``loss_fn(logits, idx)`` is the mean loss of the batch whose sample
    indices ``idx`` are on ``device``. In a multi-process run every rank takes its share of the same
    global batches and gradients are summed over ranks, so the steps equal those of one process
    with the global batch (BatchNorm statistics stay per rank).
    """
    data = DeviceSplit.of(split, device)
    total = train_steps(model, data, opt, generator, batch_size, loss_fn)
    return float(distributed.all_reduce_sum(total)) / max(len(data), 1)


def train_steps(model: nn.Module, data: DeviceSplit, opt: torch.optim.Optimizer, generator: torch.Generator,
                batch_size: int, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The steps of :func:`train_epoch`; returns this rank's loss sum on the device (no host sync)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    for x, idx, n_global in data.batches(batch_size, generator):
        loss = distributed.scaled(loss_fn(model(x), idx), len(idx), n_global)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.all_reduce_grads(params)
        opt.step()
        total += loss.detach() * n_global
    return total


def fit(model: nn.Module, split, recipe: dict, *, epochs: int, batch_size: int, lr: float, seed: int = 0,
        device="cpu", quiet: bool = False, desc: str = "vanilla") -> nn.Module:
    """Plain ERM on ``split`` (train mode, shuffled batches from a generator seeded by ``seed``).

    The split stays on the device (:class:`~bise.batching.DeviceSplit`); the progress bar shows
    each epoch's mean loss and training accuracy, both accumulated on the device and read once
    per epoch.
    """
    epochs, batch_size = validate.as_int("epochs", epochs, 0), validate.as_int("batch_size", batch_size, 1)
    lr, seed, device = validate.as_positive("lr", lr), validate.seed(seed), validate.device(device)
    model.to(device).train()
    data = DeviceSplit(split, device)
    opt = _optimizer([p for p in model.parameters() if p.requires_grad], recipe, lr)
    sched = _scheduler(opt, recipe, epochs)
    gen = torch.Generator().manual_seed(seed)
    correct = torch.zeros((), dtype=torch.int64, device=data.device)

    def loss_fn(logits, idx):
        y = data.y.index_select(0, idx)
        correct.add_((logits.detach().argmax(1) == y).sum())
        return F.cross_entropy(logits, y)

    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=distributed.quiet(quiet), leave=False)
    with rank_streams(seed, device):
        for _ in bar:
            correct.zero_()
            loss = train_epoch(model, data, opt, gen, batch_size, device, loss_fn)
            if sched is not None:
                sched.step()
            accuracy = float(distributed.all_reduce_sum(correct.clone())) / max(len(data), 1)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}")
    distributed.same_buffers(model)
    return model.eval()


def train_vanilla(data, arch: Optional[str] = None, *, epochs: Optional[int] = None,
                  batch_size: Optional[int] = None, lr: Optional[float] = None, seed: int = 0, device="cpu",
                  width: float = 1.0, quiet: bool = False, **model_kwargs) -> nn.Module:
    """Build ``arch`` for ``data`` and train it by ERM with its recipe (overridable); eval mode.

    ``seed`` fixes the initialisation, the batch order and dropout; the caller's global RNG state is
    left as it was (:func:`seeded`)."""
    validate.dataset(data)
    if arch is not None and not isinstance(arch, str):
        hint = ("; to train a model of your own use bise.train.fit(model, data.train, "
                "bise.recipes.recipe_for(data, model), ...)" if isinstance(arch, nn.Module) else "")
        raise TypeError(f"arch must be an architecture name (bise.models) or None, got {type(arch).__name__}{hint}")
    recipe = recipe_for(data, arch)
    epochs = recipe["epochs"] if epochs is None else validate.as_int("epochs", epochs, 0)
    batch_size = recipe["batch_size"] if batch_size is None else validate.as_int("batch_size", batch_size, 1)
    lr = recipe["lr"] if lr is None else validate.as_positive("lr", lr)
    seed, device = validate.seed(seed), validate.device(device)
    with seeded(seed, device):  # initialisation and dropout draw from the seeded global RNG
        model = build_model(recipe["arch"], data.num_classes, data.input_shape, width=width, **model_kwargs)
        return fit(model, data.train, recipe, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                   device=device, quiet=quiet)


__all__ = ["fit", "rank_streams", "seeded", "train_epoch", "train_steps", "train_vanilla"]
