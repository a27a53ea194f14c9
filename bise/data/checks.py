"""Validation of user-supplied arrays into Splits and a BiasedDataset, with errors that name the
split, the array and the first bad row."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .types import BiasedDataset, Split

WEIGHTINGS = ("symmetric-rho", "group-balanced", "two-bias")


def read_text(path: Path) -> str:
    """A metadata file's text as UTF-8 (a leading byte-order mark, as Excel's "CSV UTF-8" writes, dropped).
    An unreadable file (permissions) or another encoding is a ValueError naming the file (and the line);
    a missing one stays a FileNotFoundError."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: byte {raw[exc.start]:#04x} is not UTF-8; save the file as "
                         "UTF-8") from None


def _labels(where: str, a: np.ndarray, n: int, ndims: tuple) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "iub":
        raise ValueError(f"{where}: labels must be integers, got dtype {a.dtype}")
    if a.ndim not in ndims or (a.ndim == 2 and a.shape[1] != 2):  # bise.evaluate's metrics know 1 or 2 biases
        raise ValueError(f"{where}: expected shape (N,)" + (" or (N, 2) for two biases" if 2 in ndims
                                                               else "") + f", got {a.shape}")
    if len(a) != n:
        raise ValueError(f"{where}: {len(a)} labels but {n} images (lengths must match)")
    bad = np.flatnonzero((a < 0).reshape(len(a), -1).any(axis=1))
    if len(bad):
        raise ValueError(f"{where}[{bad[0]}] = {a[bad[0]].tolist()}: labels must be >= 0")
    big = np.flatnonzero((a > np.iinfo(np.int64).max).reshape(len(a), -1).any(axis=1)) if a.dtype == np.uint64 else ()
    if len(big):  # astype(int64) would wrap them to negative numbers
        raise ValueError(f"{where}[{big[0]}] = {a[big[0]].tolist()}: labels must fit int64")
    return a.astype(np.int64)


def make_split(split: str, x, y, b) -> Split:
    """A Split from channels-last uint8 images (N, H, W, C) (or (N, H, W): grey) and labels."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"{split}_x: images must be uint8 (0..255), got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{split}_x: expected shape (N, H, W, C) with C in {{1, 3}}, got {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{split}: the split is empty")
    y = _labels(f"{split}_y", y, len(x), (1,))
    b = _labels(f"{split}_b", b, len(x), (1, 2))
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return Split(xt, torch.from_numpy(y), torch.from_numpy(b))


def _count(kind: str, splits: dict, given: Optional[int], per_bias: bool) -> int:
    labels = {s: getattr(sp, kind) for s, sp in splits.items()}
    inferred = max(int(t.max()) for t in labels.values()) + 1
    if given is None:
        return inferred
    for s, t in labels.items():
        bad = torch.nonzero((t >= given).reshape(len(t), -1).any(dim=1)).flatten()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{s}_{kind}[{i}] = {t[i].tolist()}: out of range for "
                             f"num_{'bias_' if per_bias else ''}classes={given}")
    return given


def untrained_classes(y, num_classes: int, first: int = 5) -> tuple[list, int]:
    """(The first ``first`` classes in [0, num_classes) without a sample in ``y`` (a training split's
    targets), how many there are), in the time and memory of y's distinct labels: a stray label of 10**9
    made a list of a billion classes before its error."""
    present = [c for c in np.unique(np.asarray(y)).tolist() if 0 <= c < num_classes]
    missing, c = [], 0
    for p in present + [num_classes]:
        missing.extend(range(c, min(p, c + first - len(missing))))
        c = p + 1
        if len(missing) >= first:
            break
    return missing, num_classes - len(present)


def _require_trained_classes(name: str, present: dict, k: int) -> None:
    """Every target class has a training sample: one without any is never learnt, so its val / test
    samples are errors by construction (or, in no split at all, it is a head output with no class)."""
    missing, count = untrained_classes(present["train"].y, k)
    if missing:
        seen = {c: [s for s, sp in present.items() if s != "train" and bool((sp.y == c).any())] for c in missing}
        where = "; ".join(f"class {c} in {' and '.join(v) if v else 'no split'}" for c, v in seen.items())
        more = f" ... ({count} in all)" if count > len(missing) else ""
        raise ValueError(f"{name}: the train split has no sample of class(es) {missing}{more} of num_classes={k} "
                         f"({where}): a class without "
                         "training samples is never learnt. Give every class training samples, or relabel the "
                         f"targets 0..K-1 with K the number of classes trained")


def assemble(name: str, spec: str, splits: dict, *, info: dict, num_classes=None,
             num_bias_classes=None, rho=None, weighting: Optional[str] = None) -> BiasedDataset:
    """Cross-split checks (shapes, bias arity, label ranges), then the dataset. ``weighting`` None:
    "two-bias" for two bias labels a sample, else "group-balanced"."""
    for required in ("train", "test"):
        if splits.get(required) is None:
            raise ValueError(f"{name}: no {required} split")
    present = {s: sp for s, sp in splits.items() if sp is not None}
    shapes = {s: tuple(sp.x.shape[1:]) for s, sp in present.items()}
    bias_dims = {s: tuple(sp.b.shape[1:]) for s, sp in present.items()}
    for what, d in (("image shape (C, H, W)", shapes), ("bias label shape", bias_dims)):
        if len(set(d.values())) > 1:
            raise ValueError(f"{name}: splits disagree on {what}: {d}")
    two_biases = present["train"].b.dim() == 2
    if weighting is None:
        weighting = "two-bias" if two_biases else "group-balanced"
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: expected one of {WEIGHTINGS}")
    if (weighting == "two-bias") != two_biases:  # found by the extraction only, after the vanilla training
        raise ValueError(f"weighting={weighting}: " + ("needs two bias labels a sample (b of shape (N, 2)), got one"
                         if not two_biases else "takes one bias label a sample; these data have two (use two-bias)"))
    if isinstance(rho, tuple) != two_biases and rho is not None:
        raise ValueError(f"rho={rho}: two bias labels a sample take rho_l= and rho_r= (one aligned fraction per bias)"
                         if two_biases else f"rho_l, rho_r = {rho}: these data have one bias label a sample (rho=)")
    for r in rho if isinstance(rho, tuple) else [rho] if rho is not None else []:
        if not 0.0 < r < 1.0:
            raise ValueError(f"rho={r}: must lie strictly between 0 and 1")
    if weighting == "symmetric-rho" and rho is None:
        raise ValueError("weighting=symmetric-rho needs rho=<nominal aligned fraction>")
    k = _count("y", present, num_classes, False)
    kb = _count("b", present, num_bias_classes, True)
    _require_trained_classes(name, present, k)
    num_biases = 1 if present["train"].b.dim() == 1 else int(present["train"].b.shape[1])
    fractions = [float(v) for v in present["train"].aligned().double().mean(dim=0).reshape(-1)]
    aligned = [round(v, 6) for v in fractions]
    info = {**info, "sizes": {s: len(sp) for s, sp in present.items()},
            "rho_realised": aligned[0] if num_biases == 1 else aligned}
    if two_biases and rho is None and all(0.0 < v < 1.0 for v in fractions):
        # the two-bias weights need a pair: the training split's own fractions (where one is 0 or 1 the
        # extraction asks for rho_l / rho_r; training the vanilla needs none)
        rho, info["rho_from"] = tuple(fractions), "rho_realised"
    return BiasedDataset(name, splits["train"], splits.get("val"), splits["test"], k, kb,
                         num_biases, rho, weighting, spec, info)
