"""Seeded, class-stratified splitting of a source pool and bias-label assignment with exact counts."""

from __future__ import annotations

import numpy as np


def allocate(total: int, counts: np.ndarray) -> np.ndarray:
    """Split total over classes in proportion to counts (largest remainder), never above counts."""
    counts = np.asarray(counts, dtype=np.int64)
    total = min(int(total), int(counts.sum()))
    quota = total * counts / max(int(counts.sum()), 1)
    out = np.floor(quota).astype(np.int64)
    for c in np.argsort(-(quota - out), kind="stable")[: total - int(out.sum())]:
        out[c] += 1
    return np.minimum(out, counts)


def carve(y: np.ndarray, sizes: list, rng: np.random.Generator) -> list:
    """Disjoint, class-stratified index arrays from pool labels y, one per size in order.

    A size of None takes everything that is left. Each class is shuffled once, then the splits
    take consecutive runs of it, so the splits never share a source image.
    """
    classes = np.unique(y)
    order = {c: rng.permutation(np.flatnonzero(y == c)) for c in classes}
    used = {c: 0 for c in classes}
    out = []
    for size in sizes:
        left = np.array([len(order[c]) - used[c] for c in classes])
        take = left if size is None else allocate(size, left)
        parts = []
        for c, k in zip(classes, take):
            parts.append(order[c][used[c]: used[c] + k])
            used[c] += k
        idx = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        out.append(rng.permutation(idx))  # shuffled: no split is ordered by class
    return out


def bias_labels(y: np.ndarray, rho: float, k: int, rng: np.random.Generator) -> np.ndarray:
    """Bias label per sample: round(rho * N) samples in all, spread over the classes in proportion
    to their size (largest remainder), get b = y; the rest of class c are spread evenly
    (up to one) over the other k - 1 bias classes. rho = 1/k gives an unbiased split: b uniform
    and independent of y, each (y, b) cell within one sample of n_c / k.
    """
    b = np.empty(len(y), dtype=np.int64)
    classes, counts = np.unique(y, return_counts=True)
    for c, n_aligned in zip(classes, allocate(round(rho * len(y)), counts)):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = rng.integers(k - 1)  # which other classes get the one extra sample
        others = (c + 1 + (start + np.arange(len(idx) - n_aligned)) % (k - 1)) % k
        b[idx[:n_aligned]] = c
        b[idx[n_aligned:]] = rng.permutation(others)
    return b


def per_group(g: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """m random samples of every group id in g (shuffled), e.g. a group-balanced val or test set."""
    parts = [rng.choice(np.flatnonzero(g == k), m, replace=False) for k in np.unique(g)]
    return rng.permutation(np.concatenate(parts))


def cap(idx: np.ndarray, g: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """At most n of idx (n = 0: all), stratified by the group ids g of idx."""
    if not n:
        return idx
    if n > len(idx):
        raise ValueError(f"n_train={n} exceeds the {len(idx):,} training images available")
    return idx[carve(g, [n], rng)[0]]
