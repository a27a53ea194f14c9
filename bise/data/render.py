"""Colouring grey images by a bias label: foreground (LfF), background (ReBias), halves (DebiAN),
and pasting onto textures (Waterbirds-style). Inputs uint8 (N, H, W); outputs uint8 (N, C, H, W).
"""

from __future__ import annotations

import numpy as np

# ReBias' ten background colours, as fractions of 255.
PALETTE = np.array([
    [255, 0, 0], [0, 255, 0], [0, 0, 255], [225, 225, 0], [225, 0, 225],
    [0, 255, 255], [255, 128, 0], [255, 0, 128], [128, 0, 255], [128, 128, 128],
], dtype=np.float32) / np.float32(255.0)

# LfF / DebiAN colour-noise std by severity 1..5.
SEVERITY_STD = (0.05, 0.02, 0.01, 0.005, 0.002)


def colours(b: np.ndarray, severity: int, rng: np.random.Generator, palette=PALETTE) -> np.ndarray:
    """Per-sample RGB in [0, 1]: palette[b] plus Gaussian noise of the severity's std, clipped."""
    if not 1 <= severity <= len(SEVERITY_STD):
        raise ValueError(f"severity={severity}: expected an integer in 1..{len(SEVERITY_STD)}")
    noise = rng.normal(0.0, SEVERITY_STD[severity - 1], size=(len(b), 3))
    return np.clip(palette[b] + noise, 0.0, 1.0).astype(np.float32)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def foreground(grey: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """LfF Colored MNIST: the strokes take the colour, the background stays black."""
    return _to_uint8(grey[:, None].astype(np.float32) * rgb[:, :, None, None])


def background(grey: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """ReBias Biased MNIST: white strokes over a coloured background, blended by the grey level
    (ReBias thresholds at 0; blending keeps the anti-aliased edges)."""
    a = grey[:, None].astype(np.float32) / np.float32(255.0)
    return _to_uint8(np.float32(255.0) * (a + (1 - a) * rgb[:, :, None, None].astype(np.float32)))


def halves(grey: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """DebiAN Multi-Color MNIST: left and right background halves coloured independently."""
    w = grey.shape[-1]
    is_left = (np.arange(w) < w // 2)[None, None, None, :]
    rgb = np.where(is_left, left[:, :, None, None], right[:, :, None, None])
    a = grey[:, None].astype(np.float32) / np.float32(255.0)
    return _to_uint8(np.float32(255.0) * (a + (1 - a) * rgb))


def on_texture(grey: np.ndarray, tiles: np.ndarray, opaque_at: float = 32.0) -> np.ndarray:
    """Paste garments onto texture tiles (both (N, H, W)): alpha = min(1, grey / opaque_at), so the
    black Fashion-MNIST background shows the texture and the garment covers it. Returns (N, 1, H, W)."""
    g = grey.astype(np.float32)
    a = np.minimum(1.0, g / opaque_at)
    return _to_uint8(a * g + (1.0 - a) * tiles)[:, None]
