"""The mask-set protocol: on which training set BISE learns its masks and bias head (docs/data.md).

* "fresh-draw": a second draw of the biased training set: the same source images, a fresh bias
  assignment and rendering (colours, backgrounds, corruptions). The vanilla model never saw, so
  never memorised, these bias-conflicting samples; the official BISE code learns its BiasedMNIST
  masks so. The default wherever a second draw exists: the built-in benchmarks (generated from a
  seed) and user .npz files that supply one (mask_x, mask_y, mask_b).
* "vanilla-train": the vanilla model's own training set, the only choice for fixed user data.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from .types import BiasedDataset

PROTOCOLS = ("vanilla-train", "fresh-draw")


def can_redraw(data) -> bool:
    """Whether ``data`` has (or can generate) a second draw of its training set."""
    return isinstance(data, BiasedDataset) and (data.mask_train is not None or "generator" in data.info)


def default_protocol(data) -> str:
    """"fresh-draw" where a second draw exists, else "vanilla-train"."""
    return "fresh-draw" if can_redraw(data) else "vanilla-train"


def mask_data(data, protocol: Optional[str] = None) -> tuple:
    """(data whose ``train`` is the mask-learning set, protocol used); ``protocol`` None: the default.

    The returned dataset is a shallow copy (val, test and everything else shared); under
    "vanilla-train" it is ``data`` itself. The second draw is generated once and kept in
    ``data.mask_train``.
    """
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"mask_set must be one of {PROTOCOLS} or None, got {protocol!r}")
    protocol = protocol or default_protocol(data)
    if protocol == "vanilla-train":
        return data, protocol
    if not can_redraw(data):
        raise ValueError(f"mask_set='fresh-draw' needs a second draw of the training set, which "
                         f"{getattr(data, 'name', type(data).__name__)!r} has no generator for (fixed data: "
                         "use 'vanilla-train', or supply mask_x / mask_y / mask_b in the .npz)")
    if data.mask_train is None:
        from .spec import redraw

        data.mask_train = redraw(data)
    train, draw = data.train, data.mask_train
    if draw.x.shape[1:] != train.x.shape[1:] or draw.b.shape[1:] != train.b.shape[1:]:
        raise ValueError(f"{data.name}: the second draw's images / bias labels {tuple(draw.x.shape[1:])} / "
                         f"{tuple(draw.b.shape[1:])} do not match the training split's "
                         f"{tuple(train.x.shape[1:])} / {tuple(train.b.shape[1:])}")
    return dataclasses.replace(data, train=draw, info={**data.info, "mask_set": protocol}), protocol


__all__ = ["PROTOCOLS", "can_redraw", "default_protocol", "mask_data"]
