"""Waterbirds from its official on-disk layout.

Layout (ROOT): metadata.csv with columns img_filename, y, split, place (extra columns ignored);
y = 1 waterbird, 0 landbird; place = 1 water, 0 land background; split 0 = train, 1 = val,
2 = test; images at ROOT/<img_filename>. b = place, so aligned = waterbird on water or landbird
on land. The official splits are used as they are; images are resized to size x size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .assign import cap
from .checks import assemble, make_split, read_text
from .images import read_images
from .user import parse_label, read_csv

COLUMNS = ("img_filename", "y", "split", "place")


def is_waterbirds(root: Path) -> bool:
    """Whether ROOT/metadata.csv has Waterbirds' columns (rather than filename, y, b, split)."""
    meta = root / "metadata.csv"
    if not meta.is_file():
        return False
    header = {c.strip() for c in read_text(meta).partition("\n")[0].split(",")}
    return set(COLUMNS) <= header


def load_waterbirds(root: Path, spec: str, opts: dict, seed: int):
    """A BiasedDataset (group-balanced weighting) from the official Waterbirds splits."""
    meta = root / "metadata.csv"
    rows = read_csv(meta, COLUMNS)
    y = np.array([parse_label(meta, i, "y", r["y"]) for i, r in enumerate(rows)])
    b = np.array([parse_label(meta, i, "place", r["place"]) for i, r in enumerate(rows)])
    split = np.array([parse_label(meta, i, "split", r["split"]) for i, r in enumerate(rows)])
    for column, values in (("y", y), ("place", b), ("split", split)):
        limit = 3 if column == "split" else 2
        bad = np.flatnonzero(values >= limit)
        if len(bad):
            raise ValueError(f"{meta} line {bad[0] + 2}: {column}={values[bad[0]]} is not in "
                             f"0..{limit - 1}")
    rng = np.random.default_rng(seed)
    idx = {s: rng.permutation(np.flatnonzero(split == k)) for k, s in enumerate(("train", "val", "test"))}
    for s in ("train", "test"):
        if len(idx[s]) == 0:
            raise ValueError(f"{meta}: no rows with split={('train', 'val', 'test').index(s)} "
                             f"(the {s} split is empty)")
    idx["train"] = cap(idx["train"], 2 * y[idx["train"]] + b[idx["train"]], opts["n_train"], rng)
    splits = {}
    for s, i in idx.items():
        if len(i):
            x = read_images([root / rows[j]["img_filename"] for j in i], opts["size"], rgb=True,
                            where="Waterbirds: ")
            splits[s] = make_split(s, x, y[i], b[i])
    info = {"source": f"Waterbirds at {root}", "path": str(root), "seed": seed,
            "image_size": opts["size"]}
    return assemble("waterbirds", spec, splits, info=info, num_classes=2, num_bias_classes=2)
