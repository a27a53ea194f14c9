"""ChannelGate: one learnable score per channel; hard 0/1 gate forward, straight-through backward."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _checks, _ops
from ..functional import selection


class ChannelGate(nn.Module):
    """``y = x * g`` with g_c = 1 iff score_c >= threshold (or top-k by ``density``), along ``dim``.

    The BISE gate (scores start at ``init`` = 0, threshold 0, sigmoid-slope estimator with
    ``temperature``). ``enabled = False`` makes it the identity (the "vanilla" model).
    """

    def __init__(self, num_channels: int, *, dim: int = 1, threshold: Optional[float] = 0.0,
                 density: Optional[float] = None, estimator: str = "sigmoid", temperature: float = 1.0,
                 init: float = 0.0, device=None):
        super().__init__()
        if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        if density is not None:
            threshold = None
        _checks.check_mask_spec(density, threshold)
        _checks.check_estimator(estimator, temperature)
        self.num_channels = num_channels
        self.dim = dim
        self.threshold = threshold
        self.density = density
        self.estimator = estimator
        self.temperature = float(temperature)
        self.enabled = True
        self.scores = nn.Parameter(torch.full((num_channels,), float(init), device=device))

    def selection(self) -> tuple[Tensor, Tensor]:
        return selection(self.scores, self.density, self.threshold)

    def mask(self) -> Tensor:
        """Bool (num_channels,): which channels are kept."""
        thr, cut = self.selection()
        return _ops.keep_mask(self.scores.detach(), thr, cut, 0)

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        dim = _checks.check_dim(self.dim, x.dim())
        if x.shape[dim] != self.num_channels:
            raise ValueError(f"ChannelGate({self.num_channels}) got an input with {x.shape[dim]} channels "
                             f"along dim {self.dim} (shape {tuple(x.shape)})")
        thr, cut = self.selection()
        return _ops.channel_gate(x, self.scores, thr, cut, dim, self.estimator, self.temperature)

    def extra_repr(self) -> str:
        rule = f"density={self.density}" if self.density is not None else f"threshold={self.threshold}"
        return (f"{self.num_channels}, dim={self.dim}, {rule}, estimator={self.estimator}, "
                f"temperature={self.temperature}, enabled={self.enabled}")
