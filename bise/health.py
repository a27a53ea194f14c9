"""Is a vanilla model trained well enough to extract from? ``check_vanilla`` (docs/method.md).

A vanilla that did not train (training accuracy near chance, most ReLU units dead) leaves nothing
for BISE to find, and a subnetwork of it is no result: ``check_vanilla`` measures training
accuracy against chance, the share of ReLU units that never fire on training inputs, and how many
bias-conflicting training samples there are and how many the model fits, and raises
:class:`VanillaUntrained` when the model did not train (or warns, with ``strict=False``).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from .evaluate import predict

MIN_GAP_CLOSED = 0.5  # training accuracy must close at least half the gap from chance to 1
MAX_DEAD_SHARE = 0.9  # in no ReLU layer may more than this share of units never fire on training inputs
DEAD_SAMPLES = 2048  # training inputs used to find dead units


class VanillaUntrained(ValueError):
    """The vanilla model did not train (see :func:`check_vanilla`); extracting from it is meaningless."""


@dataclass
class VanillaHealth:
    """What :func:`check_vanilla` measured (accuracies in [0, 1]); ``problems`` empty when healthy."""

    train_accuracy: float
    chance: float
    min_train_accuracy: float
    dead_unit_share: Optional[float]  # over all ReLU units; None when the model has no ReLU
    worst_layer_dead_share: Optional[float]  # the ReLU layer with the most dead units
    units: int
    dead_units: int
    n_train: int
    n_conflicting_train: int
    conflicting_train_accuracy: Optional[float]  # share of conflicting training samples fit; None if none
    aligned_train_accuracy: Optional[float]
    problems: list

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@torch.no_grad()
def _dead_units(model: nn.Module, split, device, n: int) -> list:
    """(dead, total) per ReLU layer (ReLU or ReLU6; a module called at several places of a forward, as
    torchvision's BasicBlock's relu, is a layer per place): a unit (conv channel or feature) is dead if it is
    0 on all n inputs."""
    relus = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    fired: dict[tuple, torch.Tensor] = {}
    calls: dict[int, int] = {}  # per module, its calls so far in this forward

    def hook(module, _inp, out):
        key = (id(module), calls.get(id(module), 0))
        calls[key[0]] = key[1] + 1
        seen = (out > 0).transpose(0, 1).flatten(1).any(1)  # per channel / feature (dim 1)
        fired[key] = seen if key not in fired else fired[key] | seen

    handles = [m.register_forward_hook(hook) for m in relus]
    was_training = model.training
    model.eval()
    try:
        for chunk in torch.arange(min(n, len(split))).split(512):
            calls.clear()
            model(split.inputs(chunk).to(device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [(int(v.numel()) - int(v.sum()), int(v.numel())) for v in fired.values()]


def check_vanilla(model: nn.Module, data, *, device="cpu", strict: bool = True,
                  min_gap_closed: float = MIN_GAP_CLOSED, max_dead_share: float = MAX_DEAD_SHARE,
                  batch_size: int = 1024) -> VanillaHealth:
    """Measure the vanilla ``model`` on ``data.train``; raise :class:`VanillaUntrained` if it did not train.

    Untrained means: training accuracy below chance + ``min_gap_closed`` * (1 - chance), or more
    than ``max_dead_share`` of the units of some ReLU layer dead on the first 2,048 training inputs.
    ``strict=False`` warns instead of raising (the returned health says ``ok=False``).
    """
    if not 0 <= min_gap_closed <= 1:
        raise ValueError(f"min_gap_closed must be in [0, 1], got {min_gap_closed!r}")
    if not 0 < max_dead_share <= 1:
        raise ValueError(f"max_dead_share must be in (0, 1], got {max_dead_share!r}")
    split = data.train
    if split is None or len(split) == 0:
        raise ValueError("data.train is missing or empty: nothing to check the vanilla model on")
    model = model.to(device)
    pred = predict(model, split, batch_size=batch_size, device=device).cpu()
    correct = pred == split.y.cpu()
    aligned = split.aligned()
    aligned = aligned.all(dim=1) if aligned.dim() == 2 else aligned
    chance = 1.0 / data.num_classes
    floor = chance + min_gap_closed * (1 - chance)
    layers = _dead_units(model, split, device, DEAD_SAMPLES)
    dead, total = sum(d for d, _ in layers), sum(t for _, t in layers)
    worst = max((d / t for d, t in layers), default=None)
    n_conf = int((~aligned).sum())
    health = VanillaHealth(
        train_accuracy=float(correct.float().mean()), chance=chance, min_train_accuracy=floor,
        dead_unit_share=dead / total if total else None, worst_layer_dead_share=worst, units=total,
        dead_units=dead,
        n_train=len(split), n_conflicting_train=n_conf,
        conflicting_train_accuracy=float(correct[~aligned].float().mean()) if n_conf else None,
        aligned_train_accuracy=float(correct[aligned].float().mean()) if int(aligned.sum()) else None,
        problems=[])
    if health.train_accuracy < floor:
        health.problems.append(f"training accuracy {health.train_accuracy:.3f} is below {floor:.3f} (chance "
                               f"{chance:.3f}): the model did not learn its training set")
    if worst is not None and worst > max_dead_share:
        health.problems.append(f"{100 * worst:.0f}% of the units of a ReLU layer never fire on training inputs "
                               f"({dead} of {total} in all): the training recipe killed them")
    if health.problems:
        text = "vanilla model did not train: " + "; ".join(health.problems)
        if strict:
            raise VanillaUntrained(text)
        warnings.warn(text, stacklevel=2)
    return health


__all__ = ["VanillaHealth", "VanillaUntrained", "check_vanilla"]
