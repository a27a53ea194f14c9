"""bise_kernels: masked linear / conv layers and channel gates whose binary mask is computed on
the fly from learnable scores (exact top-k or a fixed threshold), with straight-through
gradients to the scores. Backends: "torch" (reference), "cpp", "cuda", "triton"; "auto" picks.
"""

from . import _ops  # noqa: F401  (registers the torch.ops.bise_kernels schemas)
from . import _flops  # noqa: F401  (FlopCounterMode formulas of the masked layer ops)
from . import nn
from .backends import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
    why_unavailable,
)
from .functional import (
    channel_gate,
    global_topk_masks,
    layerwise_topk_masks,
    masked_conv2d,
    masked_linear,
    topk_mask,
    topk_select,
    topk_threshold,
)
from .nn import ChannelGate, MaskedConv2d, MaskedLinear, mask_model, unmask_model

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ChannelGate",
    "MaskedConv2d",
    "MaskedLinear",
    "available_backends",
    "channel_gate",
    "get_backend",
    "global_topk_masks",
    "layerwise_topk_masks",
    "mask_model",
    "masked_conv2d",
    "masked_linear",
    "nn",
    "set_backend",
    "topk_mask",
    "topk_select",
    "topk_threshold",
    "unmask_model",
    "use_backend",
    "why_unavailable",
]
