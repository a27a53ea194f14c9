"""Tiny user datasets for the tests: a bise .npz (docs/data.md) of random images and labels."""

import numpy as np


def write_npz(path, *, train=60, test=20, hw=8, classes=2, bias_classes=2, seed=0):
    """Write ``{split}_x`` (uint8, N x hw x hw x 3), ``{split}_y``, ``{split}_b`` for train and test; return path."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", train), ("test", test)):
        arrays[f"{split}_x"] = rng.integers(0, 255, (n, hw, hw, 3), dtype=np.uint8)
        arrays[f"{split}_y"] = rng.integers(0, classes, n)
        arrays[f"{split}_b"] = rng.integers(0, bias_classes, n)
    np.savez(path, **arrays)
    return path
