"""CelebA from its official on-disk layout, with the EnD / BISE protocol.

Layout (ROOT):
  list_attr_celeba.txt     line 1: image count; line 2: the 40 attribute names;
                           then "000001.jpg  -1  1 ..." (one +-1 value per attribute)
  list_eval_partition.txt  "000001.jpg 0" (0 = train, 1 = valid, 2 = test)
  img_align_celeba/        000001.jpg ... (178x218 RGB)

Protocol: y = target attribute (default Blond_Hair), a = bias attribute (default Male). b is
oriented so that "aligned" (y == b) is the majority of the training partition: for Blond_Hair /
Male, b = 1 - Male (female), so blond-female and dark-male are aligned, as in the paper.
val = a group-balanced subset of the train partition, per (y, b) group 20% of the smallest
group; train = the rest of the train partition. test = the official *valid* partition cut to
equal group sizes (the official test partition is not used). Images are resized to size x size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .assign import cap, per_group
from .checks import assemble, make_split, read_text
from .images import read_images

ATTR, PARTITION, IMAGES = "list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba"


def _require(root: Path) -> None:
    for name in (ATTR, PARTITION, IMAGES):
        if not (root / name).exists():
            raise FileNotFoundError(f"CelebA layout: {root / name} not found (expected {ATTR}, "
                                    f"{PARTITION} and {IMAGES}/ under {root})")


def read_attributes(path: Path):
    """(filenames, attribute names, int8 values (N, 40) in {-1, 1})."""
    lines = read_text(path).splitlines()
    if len(lines) < 3:
        raise ValueError(f"{path}: expected a count line, a header line and data lines")
    names = lines[1].split()
    files, values = [], []
    for n, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(names) + 1:
            raise ValueError(f"{path} line {n}: {len(fields) - 1} values for {len(names)} attributes")
        bad = [v for v in fields[1:] if v not in ("1", "-1")]
        if bad:
            raise ValueError(f"{path} line {n}: value {bad[0]!r} is not 1 or -1")
        files.append(fields[0])
        values.append([int(v) for v in fields[1:]])
    return files, names, np.array(values, dtype=np.int8).reshape(len(files), len(names))


def read_partition(path: Path, files: list) -> np.ndarray:
    """Partition id (0/1/2) per file of list_attr_celeba.txt."""
    part = {}
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise ValueError(f"{path} line {n}: expected '<filename> <0|1|2>', got {line!r}")
        part[fields[0]] = int(fields[1])
    missing = [f for f in files if f not in part]
    if missing:
        raise ValueError(f"{path}: no partition for {missing[0]} ({len(missing)} files missing)")
    return np.array([part[f] for f in files])


def _column(names: list, name: str, what: str) -> int:
    if name not in names:
        raise ValueError(f"{what}={name!r} is not a CelebA attribute; attributes: {names}")
    return names.index(name)


def load_celeba(root: Path, spec: str, opts: dict, seed: int):
    """A BiasedDataset (group-balanced weighting) following the protocol in the module docstring."""
    _require(root)
    files, names, values = read_attributes(root / ATTR)
    part = read_partition(root / PARTITION, files)
    y = (values[:, _column(names, opts["target"], "target")] == 1).astype(np.int64)
    a = (values[:, _column(names, opts["bias"], "bias")] == 1).astype(np.int64)
    train_part, test_part = np.flatnonzero(part == 0), np.flatnonzero(part == 1)
    flipped = bool((y[train_part] == a[train_part]).mean() < 0.5)
    b = 1 - a if flipped else a
    g = 2 * y + b
    for where, idx in (("train", train_part), ("valid", test_part)):
        counts = np.bincount(g[idx], minlength=4)
        if counts.min() == 0:
            k = int(np.argmin(counts))
            raise ValueError(f"CelebA {where} partition has no sample with y={k // 2}, b={k % 2} "
                             f"({opts['target']} / {opts['bias']})")
    rng = np.random.default_rng(seed)
    n_val = int(0.2 * np.bincount(g[train_part]).min())
    if n_val == 0:
        raise ValueError("CelebA: the smallest training group has fewer than 5 samples; "
                         "the 20% validation subset would be empty")
    val = train_part[per_group(g[train_part], n_val, rng)]
    train = rng.permutation(np.setdiff1d(train_part, val))
    train = cap(train, g[train], opts["n_train"], rng)
    test = test_part[per_group(g[test_part], int(np.bincount(g[test_part]).min()), rng)]
    order = np.concatenate([train, val, test])
    x = read_images([root / IMAGES / files[i] for i in order], opts["size"], rgb=True,
                    where="CelebA: ")
    cuts = np.cumsum([len(train), len(val)])
    splits = {s: make_split(s, xs, y[i], b[i]) for s, xs, i in
              zip(("train", "val", "test"), np.split(x, cuts), (train, val, test))}
    info = {"source": f"CelebA at {root}", "path": str(root), "seed": seed,
            "target": opts["target"], "bias": ("not " if flipped else "") + opts["bias"],
            "protocol": "EnD: val = group-balanced 20% of the smallest train group per group; "
                        "test = official valid partition cut to equal groups",
            "image_size": opts["size"]}
    return assemble("celeba", spec, splits, info=info, num_classes=2, num_bias_classes=2)
