"""Layer widths of the built-in architectures at a width multiplier."""

from __future__ import annotations


def scaled(units: int, width: float, arch: str) -> int:
    """round(units * width): a layer that would keep no unit is refused, not widened to one (a --width of
    0.001 trained one unit per layer while run.json said 0.001)."""
    n = round(units * width)
    if n < 1:
        raise ValueError(f"width={width!r} leaves {arch}'s {units}-unit layers round({units} * {width!r}) = 0 "
                         f"units; give a width above {0.5 / units:.3g}")
    return n
