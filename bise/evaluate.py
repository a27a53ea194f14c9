"""Accuracy metrics on biased data (docs/method.md section 13): aligned / conflicting / unbiased /
worst-group accuracy, the per-(y, b) group table and, for two biases, the four alignment patterns."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import distributed, validate
from .batching import DeviceSplit

PATTERNS = ("aligned/aligned", "aligned/conflicting", "conflicting/aligned", "conflicting/conflicting")


def _mean(correct: Tensor, where: Tensor) -> Optional[float]:
    """Accuracy over the samples selected by ``where``; None when there are none (never NaN in JSON)."""
    n = int(where.sum())
    return float(correct[where].sum()) / n if n else None


def _group_key(y: int, b) -> str:
    return f"y={y},b={b}" if isinstance(b, int) else f"y={y},b={'/'.join(str(v) for v in b)}"


def metrics_from_predictions(pred: Tensor, y: Tensor, b: Tensor) -> dict:
    """METRICS from predicted classes, targets and bias labels (b of shape (N,) or (N, 2)).

    accuracy: all samples; aligned_accuracy: y == b (for every bias); conflicting_accuracy: the rest;
    groups: accuracy per (y, b) group present; unbiased_accuracy: their plain mean; worst_group_accuracy:
    their minimum. With two biases also "patterns" (aligned/conflicting per bias, left/right) and
    "pattern_average" (their unweighted mean, the Multi-Color MNIST "unbiased" figure).
    """
    pred, y, b = (torch.as_tensor(t).detach().cpu().long() for t in (pred, y, b))
    if pred.dim() != 1 or y.shape != pred.shape:
        raise ValueError(f"pred and y must be 1-D of the same length, got {tuple(pred.shape)} and {tuple(y.shape)}")
    if b.dim() not in (1, 2) or len(b) != len(y) or (b.dim() == 2 and b.shape[1] != 2):
        raise ValueError(f"b must have shape (N,) or (N, 2) with N = {len(y)}, got {tuple(b.shape)}")
    if len(y) == 0:
        raise ValueError("cannot compute metrics on an empty split")
    correct = (pred == y).float()
    bias = b.view(len(b), -1)
    agree = bias == y.view(-1, 1)
    aligned = agree.all(dim=1)
    groups = {}
    keys = torch.cat([y.view(-1, 1), bias], dim=1)
    if bool((keys < 0).any()):
        raise ValueError("y and b must be non-negative class indices")
    # one bincount over the (y, b...) rows read as mixed-radix numbers: groups in lexicographic order
    radix = (keys.max(dim=0).values + 1).tolist()
    flat = torch.zeros(len(keys), dtype=torch.long)
    for column, base in enumerate(radix):
        flat = flat * base + keys[:, column]
    size = math.prod(radix)
    counts = torch.bincount(flat, minlength=size).tolist()
    hits = torch.bincount(flat, weights=correct.double(), minlength=size).tolist()
    for code, (n, hit) in enumerate(zip(counts, hits)):
        if n:
            key, rest = [], code
            for base in reversed(radix):
                key.append(rest % base)
                rest //= base
            key.reverse()
            groups[_group_key(key[0], key[1] if bias.shape[1] == 1 else tuple(key[1:]))] = hit / n
    values = list(groups.values())
    metrics = {
        "accuracy": float(correct.mean()),
        "aligned_accuracy": _mean(correct, aligned),
        "conflicting_accuracy": _mean(correct, ~aligned),
        "unbiased_accuracy": sum(values) / len(values),
        "worst_group_accuracy": min(values),
        "groups": groups,
    }
    if bias.shape[1] == 2:
        patterns = {}
        for name in PATTERNS:
            left, right = (part == "aligned" for part in name.split("/"))
            where = (agree[:, 0] == left) & (agree[:, 1] == right)
            patterns[name] = _mean(correct, where)
        present = [v for v in patterns.values() if v is not None]
        metrics["patterns"] = patterns
        metrics["pattern_average"] = sum(present) / len(present)
    return metrics


@torch.no_grad()
def predict(model: nn.Module, split, *, batch_size: int = 256, device="cpu") -> Tensor:
    """Predicted classes of ``model`` (in eval mode, restored afterwards) on every sample of ``split``."""
    batch_size = validate.as_int("batch_size", batch_size, 1)
    validate.module(model)
    device = validate.device(device)
    param = next(model.parameters(), None)
    if param is not None and (param.device.type != device.type or
                              None not in (param.device.index, device.index) and param.device.index != device.index):
        raise ValueError(f"the model is on {param.device}, device={str(device)!r}: move it there first "
                         f"(model.to({str(device)!r}))")
    was_training = model.training
    model.eval()
    try:
        if len(split) == 0:
            return torch.empty(0, dtype=torch.long)
        # each rank of a multi-process run predicts its shard; the exact predictions are gathered
        # (on the device, read once)
        data = DeviceSplit.of(split, device)
        return distributed.shard_rows(len(split), lambda idx: model(data.inputs(idx)).argmax(dim=1),
                                      batch_size).cpu()
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, split, *, batch_size: int = 256, device="cpu") -> dict:
    """METRICS of ``model`` on a data split (``.inputs()``, ``.y``, ``.b``).

    Given a whole dataset (with ``.test``), returns {"test": METRICS, "val": METRICS} (val if present)."""
    validate.module(model)
    device = validate.device(device)
    if hasattr(split, "test") and not hasattr(split, "inputs"):
        out = {"test": evaluate(model, split.test, batch_size=batch_size, device=device)}
        if getattr(split, "val", None) is not None:
            out["val"] = evaluate(model, split.val, batch_size=batch_size, device=device)
        return out
    for attr in ("inputs", "y", "b"):
        if not hasattr(split, attr):
            raise TypeError(f"split must be a data split with .inputs(), .y and .b; {type(split).__name__} "
                            f"has no {attr!r}")
    if split.b is None:
        raise ValueError("split.b is None: the metrics need the bias labels of every sample (for accuracy alone, "
                         "compare bise.evaluate.predict(model, split) with split.y)")
    pred = predict(model, split, batch_size=batch_size, device=device)
    return metrics_from_predictions(pred, split.y, split.b)
