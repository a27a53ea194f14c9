"""Argument validation shared by every op and backend: named errors, before any kernel launch.

Value checks (NaN/inf scores) never sync the host with a GPU: on CPU they raise ValueError;
on other devices they are device-side asserts (``torch._assert_async``); under tracing
(torch.compile / export) they are skipped, as the values are not known.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
ESTIMATORS = ("ste", "sigmoid")


def check_scores(scores: object, name: str = "scores") -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), got {scores.dtype}")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(scores.shape)}); top-k needs at least one score")
    check_finite(scores, name)
    return scores


def check_finite(t: torch.Tensor, name: str) -> None:
    if torch.compiler.is_compiling() or t.device.type == "meta" or _is_fake(t):
        return
    if t.device.type == "cpu":
        # one reduction pass: aminmax propagates NaN and exposes +-inf (~18x cheaper than isfinite().all())
        if not bool(torch.isfinite(torch.stack(torch.aminmax(t))).all()):
            bad = t.reshape(-1)[~torch.isfinite(t.reshape(-1))][0].item()
            raise ValueError(f"{name} contains non-finite values (e.g. {bad}); NaN and inf scores are not allowed")
    else:
        torch._assert_async(torch.isfinite(t).all(), f"{name} contains NaN or inf")


def _is_fake(t: torch.Tensor) -> bool:
    return type(t).__name__ in ("FakeTensor", "FunctionalTensor")


def check_density(density: object, name: str = "density") -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {density!r}")
    if not (0.0 < float(density) <= 1.0) or math.isnan(float(density)):
        raise ValueError(f"{name} must be in (0, 1] (the fraction of entries kept), got {density!r}")
    return float(density)


def k_from_density(density: float, numel: int) -> int:
    """k = round(density * numel), at least 1: the number of entries kept."""
    return max(1, min(numel, int(round(check_density(density) * numel))))


def check_k(k: object, numel: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {k!r}")
    if not 1 <= k <= numel:
        raise ValueError(f"{name} must be in [1, {numel}] (numel of the scores), got {k}")
    return k


def check_same_device_dtype(tensors: Sequence[torch.Tensor], name: str) -> None:
    first = tensors[0]
    for i, t in enumerate(tensors[1:], start=1):
        if t.device != first.device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {first.device}; all must share a device")
        if t.dtype != first.dtype:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype} but {name}[0] has {first.dtype}; all must share a dtype")


def check_score_list(tensors: object, name: str = "scores") -> list[torch.Tensor]:
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list of tensors, got {type(tensors).__name__}")
    if len(tensors) == 0:
        raise ValueError(f"{name} is an empty list")
    for i, t in enumerate(tensors):
        check_scores(t, f"{name}[{i}]")
    check_same_device_dtype(tensors, name)
    return list(tensors)


def check_mask_spec(density: Optional[float], threshold: object) -> None:
    if (density is None) == (threshold is None):
        raise ValueError(
            f"give exactly one of density (top-k) or threshold (scores >= threshold); "
            f"got density={density!r}, threshold={threshold!r}"
        )
    if density is not None:
        check_density(density)
    if isinstance(threshold, float) and not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")


def check_estimator(estimator: object, temperature: object) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive float, got {temperature!r}")
    if not (float(temperature) > 0 and math.isfinite(float(temperature))):
        raise ValueError(f"temperature must be a positive finite float, got {temperature!r}")


def check_layer_scores(scores: torch.Tensor, weight: torch.Tensor) -> None:
    """Scores are weight-shaped (unstructured) or (out,) (one per output unit)."""
    check_tensor(weight, "weight")
    if scores.shape != weight.shape and tuple(scores.shape) != (weight.shape[0],):
        raise ValueError(
            f"scores must have weight's shape {tuple(weight.shape)} or ({weight.shape[0]},), "
            f"got {tuple(scores.shape)}"
        )
    check_like(scores, weight, "scores", "weight", dtype=False)


def check_tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    return t


def check_like(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")


def check_pair(value: object, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def check_conv_shapes(x: torch.Tensor, weight: torch.Tensor, groups: object) -> None:
    """4-d input and weight whose channels fit ``groups``."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"x and weight must be 4-d (N,C,H,W) and (O,C/groups,kH,kW), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or x.shape[1] != weight.shape[1] * groups \
            or weight.shape[0] % groups:
        raise ValueError(f"groups={groups!r} does not fit x channels {x.shape[1]} and weight {tuple(weight.shape)}")


def check_dim(dim: object, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {dim!r}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim must be in [{-ndim}, {ndim - 1}] for a {ndim}-d input, got {dim}")
    return dim % ndim
