"""Drop-in masked modules: MaskedLinear, MaskedConv2d, ChannelGate, mask_model and unmask_model."""

from .gate import ChannelGate
from .masked import MaskedConv2d, MaskedLinear, init_scores
from .model import GlobalSelection, mask_model, unmask_model

__all__ = ["ChannelGate", "GlobalSelection", "MaskedConv2d", "MaskedLinear", "init_scores", "mask_model",
           "unmask_model"]
