"""Batches for the training and evaluation loops, drawn where the model runs.

:class:`DeviceSplit` puts a split's uint8 images, targets and bias labels on the device once
(``resident``) when the images fit the memory budget, and then draws every batch there by index:
no host-to-device copy, no host work and no synchronisation per step. The float conversion
(``x / 255``, bit for bit :meth:`bise.data.types.Split.inputs`) is done on the gathered batch
only, never as a separate pass over the split. Data over the budget stays on the host and is fed
by a ``torch.utils.data.DataLoader`` (pinned memory, non-blocking copies).

Determinism contract: the batch order is the one of :func:`bise.distributed.global_batches`,
drawn from the same CPU generator (a ``torch.randperm`` per epoch), so a seed gives the same
batches, in the same order, on every device and whether or not the data are resident; only the
permutation (8 bytes a sample) is copied to the device, once per epoch and without a sync.

Memory budget (``resident_limit_bytes``): on the CPU the split is used where it is (no copy, no
limit); on an accelerator the images are made resident when they take at most
``RESIDENT_LIMIT_BYTES`` (2 GiB) and at most a quarter of the device's memory. Every built-in
benchmark fits (the largest training split, fashion-colored's 55,000 x 3 x 28 x 28 bytes: 129 MB).
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from . import distributed
from .data.types import Split

RESIDENT_LIMIT_BYTES = 2 * 2**30


def resident_limit(device: torch.device) -> float:
    """The byte budget for resident images on ``device`` (see the module docstring)."""
    if device.type == "cpu":
        return float("inf")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return min(RESIDENT_LIMIT_BYTES, total / 4)
    return RESIDENT_LIMIT_BYTES


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` without blocking the host (pinned staging for CUDA)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def as_float(x: Tensor) -> Tensor:
    """uint8 images -> float32 in [0, 1], exactly as :meth:`bise.data.types.Split.inputs`."""
    return x.to(torch.float32).div_(255.0)


class _Rows(torch.utils.data.Dataset):
    """A DataLoader dataset whose item is a whole batch: ``rows[idx] = x[idx]`` (uint8)."""

    def __init__(self, x: Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: Tensor) -> Tensor:
        return self.x[idx]


class DeviceSplit:
    """A data split as the loops use it: targets and labels on ``device``, images resident if they fit.

    ``split``: a :class:`~bise.data.types.Split` (uint8 images), or any object with ``inputs()``,
    ``y`` and optionally ``b`` (its ``inputs()`` is then taken once, as the images).

    ``batches()`` yields ``(inputs, idx, n_global)``: the float batch on the device, the batch's
    sample indices on the device (for looking up labels or cached features) and the global batch
    size (see :func:`bise.distributed.local_batches`).
    """

    def __init__(self, split, device, resident_limit_bytes: Optional[float] = None):
        """``resident_limit_bytes``: the budget (default :func:`resident_limit`); 0 forces the DataLoader path."""
        self.split, self.device = split, torch.device(device)
        limit = resident_limit(self.device) if resident_limit_bytes is None else resident_limit_bytes
        # a bise Split holds uint8 images (converted per batch); another split object, its inputs()
        self.convert = as_float if isinstance(split, Split) else (lambda t: t)
        x = split.x if isinstance(split, Split) else split.inputs()
        self.resident = x.numel() * x.element_size() <= limit
        self.x = to_device(x, self.device) if self.resident else x
        self.y = to_device(split.y.long(), self.device)
        b = getattr(split, "b", None)
        self.b = None if b is None else to_device(b.long(), self.device)

    def __len__(self) -> int:
        return len(self.split)

    @classmethod
    def of(cls, data, device) -> "DeviceSplit":
        """``data`` if it already is a DeviceSplit on ``device``, else a DeviceSplit of it."""
        if isinstance(data, cls) and data.device == torch.device(device):
            return data
        return cls(data.split if isinstance(data, cls) else data, device)

    def inputs(self, idx: Tensor) -> Tensor:
        """Float inputs of the samples ``idx`` (an index tensor, host or device) on the device.

        Resident data: a gather on the device. Host data: a host gather of ``idx`` (reading a
        device index costs a sync; the loops use :meth:`batches` instead).
        """
        if self.resident:
            return self.convert(self.x.index_select(0, to_device(idx, self.device)))
        return self.convert(to_device(self.x.index_select(0, idx.cpu()), self.device))

    def _order(self, batch_size: int, generator: Optional[torch.Generator],
               ctx: Optional[distributed.Context]) -> tuple[list[Tensor], list[Tensor], list[int]]:
        """This rank's batch indices on the host and on the device, and the global batch sizes."""
        ctx = ctx or distributed.current()
        host = distributed.global_batches(len(self), batch_size, generator, shuffle=generator is not None)
        order = to_device(torch.cat(host), self.device) if host else torch.empty(0, dtype=torch.long)
        return ([distributed.local_share(b, ctx) for b in host],
                [distributed.local_share(b, ctx) for b in order.split(batch_size)], [b.numel() for b in host])

    def indices(self, batch_size: int, generator: Optional[torch.Generator] = None,
                ctx: Optional[distributed.Context] = None) -> list[tuple[Tensor, int]]:
        """One epoch of ``(idx, n_global)`` with ``idx`` on the device (no images gathered)."""
        _, local, sizes = self._order(batch_size, generator, ctx)
        return list(zip(local, sizes))

    def batches(self, batch_size: int, generator: Optional[torch.Generator] = None,
                ctx: Optional[distributed.Context] = None) -> Iterator[tuple[Tensor, Tensor, int]]:
        """One epoch of ``(inputs, idx, n_global)``: shuffled by ``generator``, in order without one."""
        host, local, sizes = self._order(batch_size, generator, ctx)
        if self.resident:
            for idx, n_global in zip(local, sizes):
                yield self.convert(self.x.index_select(0, idx)), idx, n_global
            return
        loader = DataLoader(_Rows(self.x), batch_size=None, sampler=host, pin_memory=self.device.type == "cuda")
        for x, idx, n_global in zip(loader, local, sizes):
            yield self.convert(x.to(self.device, non_blocking=True)), idx, n_global


__all__ = ["DeviceSplit", "RESIDENT_LIMIT_BYTES", "as_float", "resident_limit", "to_device"]
