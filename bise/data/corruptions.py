"""Ten image corruptions computable with numpy, scipy and Pillow: the bias of Corrupted
Fashion-MNIST (analogue of LfF's Corrupted CIFAR-10). Corruption k is bias class k.

Each takes uint8 grey images (N, H, W) and a numpy Generator and returns uint8 (N, H, W).
One fixed severity each, chosen so the garment stays recognisable.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _ndimage():
    """scipy.ndimage, imported on first use: importing bise.data stays fast for cached loads."""
    from scipy import ndimage
    return ndimage


def _clip(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def gaussian_noise(x, rng):
    return _clip(x + rng.normal(0.0, 0.15 * 255, x.shape))


def shot_noise(x, rng):
    return _clip(rng.poisson(x / 255.0 * 12.0) / 12.0 * 255)


def impulse_noise(x, rng):
    u = rng.random(x.shape)
    return np.where(u < 0.06, 0, np.where(u > 0.94, 255, x)).astype(np.uint8)


def gaussian_blur(x, rng):
    return _clip(_ndimage().gaussian_filter(x.astype(np.float64), sigma=(0, 1.2, 1.2)))


def motion_blur(x, rng):
    """Box blur along one axis (7 pixels horizontally), like a camera shake."""
    return _clip(_ndimage().uniform_filter1d(x.astype(np.float64), size=7, axis=2))


def pixelate(x, rng):
    n, h, w = x.shape
    small = [Image.fromarray(i).resize((w // 3, h // 3), Image.BOX) for i in x]
    return np.stack([np.asarray(s.resize((w, h), Image.NEAREST)) for s in small])


def contrast(x, rng):
    mean = x.mean(axis=(1, 2), keepdims=True)
    return _clip((x - mean) * 0.3 + mean)


def brightness(x, rng):
    return _clip(x * 0.5 + 0.55 * 255)


def jpeg(x, rng):
    out = []
    for i in x:
        buf = io.BytesIO()
        Image.fromarray(i).save(buf, format="JPEG", quality=6)
        buf.seek(0)
        out.append(np.asarray(Image.open(buf).convert("L")))
    return np.stack(out)


def elastic(x, rng):
    """Random smooth displacement field (std 1 px, smoothing sigma 3 px), bilinear resampling."""
    n, h, w = x.shape
    out = np.empty_like(x)
    grid = np.mgrid[0:h, 0:w].astype(np.float64)
    ndimage = _ndimage()
    for i in range(n):
        d = ndimage.gaussian_filter(rng.uniform(-1, 1, (2, h, w)), sigma=(0, 3, 3))
        d *= 1.0 / max(float(d.std()), 1e-12)
        out[i] = _clip(ndimage.map_coordinates(x[i].astype(np.float64), grid + d, order=1))
    return out


CORRUPTIONS = (gaussian_noise, shot_noise, impulse_noise, gaussian_blur, motion_blur,
               pixelate, contrast, brightness, jpeg, elastic)
NAMES = tuple(f.__name__ for f in CORRUPTIONS)


def corrupt(x: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply corruption b[i] to image x[i] (grey uint8 (N, H, W)); returns uint8 (N, H, W)."""
    out = np.empty_like(x)
    for k, fn in enumerate(CORRUPTIONS):
        idx = np.flatnonzero(b == k)
        if len(idx):
            out[idx] = fn(x[idx], rng)
    return out
