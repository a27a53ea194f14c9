"""Reading image files with Pillow into one preallocated uint8 array (upright: EXIF orientation applied), with
errors naming the file."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_GREY_MODES = ("1", "L", "LA", "La")  # grey, with or without alpha (dropped, as RGBA's)
# Pillow's convert("L") clips these to 0..255 (a 16-bit PNG reads as nearly all 255, a float image
# in [0, 1] as 0): refused, since any rescaling would be a guess
_WIDE_MODES = {"I": "32-bit integer", "F": "32-bit float", "I;16": "16-bit", "I;16B": "16-bit",
               "I;16L": "16-bit", "I;16N": "16-bit"}


def _open(p: Path, size: Optional[int], rgb: Optional[bool], where: str) -> np.ndarray:
    try:
        with Image.open(p) as im:
            mode = im.mode
            if mode not in _WIDE_MODES:
                if size is not None:
                    im.draft(im.mode, (size, size))  # JPEG: decode at a reduced scale, still >= size
                im.load()
                im = ImageOps.exif_transpose(im)  # upright, as a viewer shows it (a phone's JPEG: EXIF Orientation)
                grey = rgb is False or (rgb is None and im.mode in _GREY_MODES)
                im = im.convert("L" if grey else "RGB")
                if size is not None:
                    im = im.resize((size, size), Image.BILINEAR)
                a = np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}image file not found: {p}") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{where}cannot read image {p}: {e}") from None
    if mode in _WIDE_MODES:
        raise ValueError(f"{where}{p}: mode {mode} ({_WIDE_MODES[mode]}) pixels are not read: bise keeps "
                         "8-bit pixels (0..255); convert the images to 8-bit grey or RGB first")
    return a[..., None] if a.ndim == 2 else a


def read_images(paths: Sequence[Path], size: Optional[int], rgb: Optional[bool] = None,
                where: str = "") -> np.ndarray:
    """uint8 (N, H, W, C). size: resize every image to size x size (bilinear), else all images must
    share one size. rgb: force RGB (True) or grey (False); None: grey (C=1) only if every file is."""
    out = None
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))  # Pillow decodes without the GIL
    try:
        decoded = pool.map(lambda p: _open(p, size, rgb, where), paths)
        for i, (p, a) in enumerate(zip(paths, decoded)):
            out = _store(out, i, a, p, paths, where)
    finally:
        pool.shutdown(cancel_futures=True)  # on an error, skip the images not yet decoded
    if out is None:
        raise ValueError(f"{where}no images to read")
    return out


def _store(out, i: int, a: np.ndarray, p: Path, paths: Sequence[Path], where: str) -> np.ndarray:
    """Put image i into the preallocated array (allocated from the first image)."""
    if out is None:
        out = np.empty((len(paths), *a.shape), np.uint8)
    if a.shape[:2] != out.shape[1:3]:
        raise ValueError(f"{where}image {p} is {a.shape[1]}x{a.shape[0]} but {paths[0]} is "
                         f"{out.shape[2]}x{out.shape[1]}; pass size=N to resize all to NxN")
    if a.shape[2] > out.shape[3]:  # first colour image after grey ones: widen what we have
        out = np.repeat(out, 3, axis=3)
    out[i] = a
    return out
