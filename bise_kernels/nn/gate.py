"""ChannelGate: one learnable score per channel; hard 0/1 gate forward, straight-through backward."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, fx

from .. import _checks, _ops
from ..functional import _fused_check, _gate_op, _gate_threshold
from ._scored import ScoredModule


class ChannelGate(ScoredModule):
    """``y = x * g`` with g_c = 1 iff score_c >= threshold (or top-k by ``density``), along ``dim``.

    The BISE gate (scores start at ``init`` = 0, threshold 0 unless ``density`` is given, not both;
    sigmoid-slope estimator with ``temperature``). ``enabled = False`` makes it the identity (the
    "vanilla" model). ``device`` / ``dtype``: the scores', as nn modules' factory arguments.
    """

    def __init__(self, num_channels: int, *, dim: int = 1, threshold: Optional[float] = None,
                 density: Optional[float] = None, estimator: str = "sigmoid", temperature: float = 1.0,
                 init: float = 0.0, device=None, dtype=None):
        super().__init__()
        num_channels, dim = _checks.check_int(num_channels, "num_channels"), _checks.check_int(dim, "dim")
        if num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        self.init = _checks.check_real(init, "init")
        _checks.check_dtype(dtype)
        self._init_rule(torch.full((num_channels,), self.init, device=device, dtype=dtype), density,
                        _gate_threshold(density, threshold), estimator, temperature)
        self.num_channels = num_channels
        self.dim = dim
        self.enabled = True

    def reset_parameters(self) -> None:
        """Every score back to ``init`` (deferred initialisation calls it, as on nn.Linear)."""
        with torch.no_grad():
            self.scores.fill_(self.init)

    def forward(self, input: Tensor) -> Tensor:  # nn modules' name, as MaskedLinear's: gate(input=x) works
        if isinstance(input, fx.Proxy):  # one node, enabled or not (read when the traced model runs)
            return self._fx_node(input)
        if not self.enabled:
            return input
        if not isinstance(input, Tensor) or input.is_nested or input.dim() == 0:  # a nested one's .shape fails
            _checks.check_channel_gate(input, self.scores, None, None, self.dim)  # names x
        dim = _checks.check_dim(self.dim, input.dim())
        if input.shape[dim] != self.num_channels:
            raise ValueError(f"ChannelGate({self.num_channels}) got an input with {input.shape[dim]} channels "
                             f"along dim {self.dim} (shape {tuple(input.shape)})")
        scores = self.scores
        native = _gate_op(input)
        thr, cut = self._selection(scores, _fused_check(native, self.threshold))
        return _ops.channel_gate.run(native, input, scores, thr, cut, dim, self.estimator, self.temperature)

    def extra_repr(self) -> str:
        return (f"{self.num_channels}, dim={self.dim}, {self._rule_repr()}, temperature={self.temperature}, "
                f"enabled={self.enabled}")
