"""The user's own data: an .npz of arrays, or an image folder with metadata.csv.

npz keys: train_x, train_y, train_b, test_x, test_y, test_b and optionally val_x, val_y, val_b
(all three or none) and mask_x, mask_y, mask_b: a second draw of the training set from the
user's generator (same source images, fresh bias assignment), for the fresh-draw mask-set
protocol (bise.data.maskset). Images uint8 (N, H, W, C) with C in {1, 3} ((N, H, W) is read as grey);
labels integer (N,), bias labels (N,) or (N, 2) (two biases).

Folder: DIR/metadata.csv with columns filename, y, b, split (split in train/val/test; extra
columns ignored); filename is relative to DIR; images are read with Pillow.
"""

from __future__ import annotations

import csv
import io
import warnings
import zipfile
from pathlib import Path

import numpy as np

from .checks import assemble, make_split, read_text
from .images import read_images

SPLITS = ("train", "val", "test")
USER_OPTIONS = {"num_classes": int, "num_bias_classes": int, "rho": float, "rho_l": float, "rho_r": float,
                "weighting": str}


def dataset_options(opts: dict) -> dict:
    """The keyword arguments of checks.assemble that the user may set in the spec: ``rho`` (one bias) or
    the pair ``rho_l`` and ``rho_r`` (two biases, as the built-in multicolor-mnist) as assemble's rho."""
    out = {k: opts[k] for k in ("num_classes", "num_bias_classes", "rho", "weighting") if opts.get(k) is not None}
    pair = (opts.get("rho_l"), opts.get("rho_r"))
    if pair != (None, None):
        if None in pair:
            raise ValueError(f"rho_l and rho_r go together (the aligned fractions of the left and right bias), got "
                             f"rho_l={pair[0]}, rho_r={pair[1]}")
        if "rho" in out:
            raise ValueError("give rho= (one bias label a sample) or rho_l= and rho_r= (two), not both")
        out["rho"] = pair
    return out


def load_npz(path: Path, spec: str, opts: dict):
    """A BiasedDataset from an .npz file (see the module docstring for the keys)."""
    if not path.is_file():
        raise FileNotFoundError(f"no such .npz file: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a readable .npz file (not a zip archive of arrays)")
    try:
        with np.load(path, allow_pickle=False) as z:
            have = set(z.files)
            need = [f"{s}_{a}" for s in ("train", "test") for a in "xyb"]
            if have & {"val_x", "val_y", "val_b"}:
                need += ["val_x", "val_y", "val_b"]
            missing = [k for k in need if k not in have]
            if missing:
                raise ValueError(f"{path}: missing key {missing[0]!r} (keys present: {sorted(have)}; "
                                 f"required: train_x/y/b and test_x/y/b, val_x/y/b optional)")
            unknown = sorted(have - {f"{s}_{a}" for s in (*SPLITS, "mask") for a in "xyb"})
            if unknown:  # a misspelt split (valid_x) would silently be no split
                warnings.warn(f"{path}: keys {unknown} are not read (bise reads train_, val_, test_ and mask_ "
                              "x / y / b)", stacklevel=2)
            splits = {s: make_split(s, *(_array(z, path, f"{s}_{a}") for a in "xyb"))
                      for s in SPLITS if f"{s}_x" in need}
            mask = _mask_split(z, path, have)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    info = {"source": f"user npz {path}", "path": str(path)}
    ds = assemble(path.stem, spec, {**splits, **({"mask": mask} if mask is not None else {})}, info=info,
                  **dataset_options(opts))
    ds.mask_train = mask
    ds.info["sizes"].pop("mask", None)
    return ds


def _mask_split(z, path: Path, have: set):
    """The optional second draw of the training set (mask_x, mask_y, mask_b: all three or none)."""
    keys = {"mask_x", "mask_y", "mask_b"}
    if not have & keys:
        return None
    if not keys <= have:
        raise ValueError(f"{path}: a second draw needs all of mask_x, mask_y, mask_b; found only "
                         f"{sorted(have & keys)}")
    return make_split("mask", *(_array(z, path, f"mask_{a}") for a in "xyb"))


def _array(z, path: Path, key: str) -> np.ndarray:
    try:
        return z[key]
    except ValueError as e:  # e.g. an object array, which would need pickle
        raise ValueError(f"{path}: key {key!r} is not a plain numeric array ({e})") from None


def read_csv(path: Path, required: tuple) -> list:
    """Rows of a CSV file as dicts; a missing file or column is a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    for col in required:
        if col not in columns:
            raise ValueError(f"{path}: missing column {col!r} (columns: {columns})")
    rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    if not rows:
        raise ValueError(f"{path}: no data rows")
    return rows


def parse_label(path: Path, row: int, column: str, text: str) -> int:
    """A non-negative integer cell of data row `row` (0-based; the file line is row + 2)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{path} line {row + 2}: {column}={text!r} is not a non-negative integer")
    return value


def load_folder(root: Path, spec: str, opts: dict):
    """A BiasedDataset from DIR/metadata.csv (filename, y, b, split) and the images it names."""
    meta_path = root / "metadata.csv"
    rows = read_csv(meta_path, ("filename", "y", "b", "split"))
    files, ys, bs, which = [], [], [], []
    for i, r in enumerate(rows):
        if r["split"] not in SPLITS:
            raise ValueError(f"{meta_path} line {i + 2}: split={r['split']!r} is not one of "
                             f"train, val, test")
        files.append(root / r["filename"])
        ys.append(parse_label(meta_path, i, "y", r["y"]))
        bs.append(parse_label(meta_path, i, "b", r["b"]))
        which.append(r["split"])
    which, ys, bs = np.array(which), np.array(ys), np.array(bs)
    for s in ("train", "test"):
        if not (which == s).any():
            raise ValueError(f"{meta_path}: no rows with split={s} (the {s} split is empty)")
    x = read_images(files, opts.get("size"), where=f"{meta_path}: ")
    splits = {s: make_split(s, x[which == s], ys[which == s], bs[which == s])
              for s in SPLITS if (which == s).any()}
    info = {"source": f"user image folder {root}", "path": str(root)}
    return assemble(root.name, spec, splits, info=info, **dataset_options(opts))
