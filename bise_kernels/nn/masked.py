"""MaskedLinear and MaskedConv2d: drop-in layers whose weight is masked by learnable scores."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.utils import _pair

from .. import _checks, _ops
from ..functional import _autocast, _fused_check
from ._scored import ScoredModule

GRANULARITIES = ("weight", "channel")
MASK_MODES = ("auto", "selection", "keep")
"""How a MaskedLinear / MaskedConv2d hands its mask to the op: "selection" (the kernels re-evaluate
the keep rule on the scores in every pass), "keep" (the selection packed once per step into a bool
mask that forward and backward read: ``masked_linear_keep`` / ``masked_conv2d_keep``), or "auto"
(per device, :data:`KEEP_BY_DEFAULT`)."""

KEEP_BY_DEFAULT = {"cpu": False, "cuda": False}
""""auto" mask mode per device type. CUDA: "selection" until a committed GPU measurement shows the
packed mask faster (benchmarks/bench_masked_gpu.py times both). CPU: see docs/masked_cpu.md."""


def _check_mask_mode(mode: str) -> str:
    if mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mode!r}")
    return mode


def _check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


def _numeric_padding(padding, kernel_size, stride, dilation) -> Union[int, tuple[int, int]]:
    """nn.Conv2d's ``padding`` as numbers: "valid" is 0; "same" (stride 1, as nn.Conv2d requires) is half
    the dilated kernel's extent on each side, where that is symmetric (nn.Conv2d pads one side more
    otherwise, which a masked conv does not)."""
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return (0, 0)
    if padding != "same":
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    kernel, dilation = _pair(kernel_size), _pair(dilation)
    if _pair(stride) != (1, 1):
        raise ValueError(f"padding='same' needs stride 1 (as in nn.Conv2d), got stride={stride!r}")
    extent = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if extent[0] % 2 or extent[1] % 2:
        raise ValueError(f"padding='same' with kernel_size {kernel} and dilation {dilation} pads one side more than "
                         f"the other, which MaskedConv2d does not support; give numeric padding")
    return (extent[0] // 2, extent[1] // 2)


def _check_padding_mode(padding_mode: str) -> None:
    if padding_mode != "zeros":
        raise ValueError(f"MaskedConv2d supports padding_mode='zeros' only, got padding_mode={padding_mode!r}")


def check_dense(module: nn.Module, base: type) -> None:
    """Raise unless ``from_dense`` can wrap ``module`` (an instance of ``base``, nn.Linear or nn.Conv2d)
    into a masked layer that computes what it computed: not a lazy module still uninitialised, not a
    subclass (a masked layer runs nn.Linear's / nn.Conv2d's computation, not the subclass's own
    forward, parametrization or fake quantization), a weight with elements, and (nn.Conv2d) zero
    padding that is symmetric."""
    kind = type(module).__name__
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        raise ValueError(f"{kind} is not initialised yet: run one forward pass first (it then becomes "
                         f"nn.{base.__name__})")
    if isinstance(module, _MaskedLayer):
        raise TypeError(f"{kind} is masked already (to_dense() gives the plain layer with its mask baked in)")
    if type(module) is not base:
        raise TypeError(f"{kind} is a subclass of nn.{base.__name__} (a masked layer runs nn.{base.__name__}'s "
                        f"computation only, not a subclass's forward, parametrization or fake quantization)")
    if module.weight.numel() == 0:
        raise ValueError(f"{kind} has no weight to mask: weight of shape {tuple(module.weight.shape)}")
    if base is nn.Conv2d:
        _check_padding_mode(module.padding_mode)
        _numeric_padding(module.padding, module.kernel_size, module.stride, module.dilation)


def init_scores(weight: Tensor, granularity: str, score_init: Union[str, float]) -> Tensor:
    """Initial scores: "kaiming" (edge-popup), "magnitude" (|w| or per-unit L2 norm), "zeros", or a constant."""
    shape = weight.shape if granularity == "weight" else (weight.shape[0],)
    with torch.no_grad():
        if _checks.is_real(score_init):
            return torch.full(shape, _checks.check_real(score_init, "score_init"), dtype=torch.float32,
                              device=weight.device)
        if score_init == "zeros":
            return torch.zeros(shape, dtype=torch.float32, device=weight.device)
        if score_init == "magnitude":
            w = weight.detach().float()
            return w.abs() if granularity == "weight" else w.reshape(w.shape[0], -1).norm(dim=1)
        if score_init == "kaiming":
            scores = torch.empty(shape, dtype=torch.float32, device=weight.device)
            fan_in = weight[0].numel() if weight.dim() > 1 else 1
            bound = 1.0 / math.sqrt(fan_in) * math.sqrt(3.0)
            return scores.uniform_(-bound, bound)
    raise ValueError(f"score_init must be 'kaiming', 'magnitude', 'zeros' or a float, got {score_init!r}")


class _MaskedLayer(ScoredModule):
    """A masked weight: scores per weight or per output unit, an optional global selector."""

    weight: nn.Parameter
    bias: Optional[nn.Parameter]

    def _init_mask(self, granularity, density, threshold, estimator, temperature, score_init):
        self.granularity = _check_granularity(granularity)
        if self.weight.numel() == 0:  # a top-k or threshold needs a score to select (nn.Linear(0, n) has none)
            raise ValueError(f"{type(self).__name__} has no weight to mask: weight of shape {tuple(self.weight.shape)}")
        self._init_rule(init_scores(self.weight, granularity, score_init), density, threshold, estimator,
                        temperature)
        self.score_init = score_init
        self.global_selector = None  # set by mask_model(scope="global")

    def _reset_scores(self) -> None:
        """The scores set again by ``score_init`` (from the current weight for "magnitude"), after the
        dense layer's reset_parameters, which its __init__ calls before the scores exist."""
        if "scores" in self._parameters:
            with torch.no_grad():
                self.scores.copy_(init_scores(self.weight, self.granularity, self.score_init))

    def _selection(self, scores: Tensor, fused_check: bool) -> tuple[Tensor, Tensor]:
        """``(thr, cut)`` of this layer's scores, or of its share of a global top-k (whose select
        checks the scores: ``fused_check`` does not apply)."""
        if self.global_selector is not None:
            return self.global_selector.selection_for(self)
        return ScoredModule._selection(self, scores, fused_check)  # super(): +0.08 us (timeit)

    def _drop_caches(self) -> None:
        """The layer's caches and its global selector's (which holds this layer's scores)."""
        super()._drop_caches()
        if self.global_selector is not None:
            self.global_selector._cache = None

    @property
    def mask_mode(self) -> str:
        """How the mask reaches the op (:data:`MASK_MODES`)."""
        return self.__dict__.get("_mask_mode", "auto")  # "auto" for layers built by from_dense

    @mask_mode.setter
    def mask_mode(self, mode: str) -> None:
        self.__dict__["_mask_mode"] = _check_mask_mode(mode)

    def _uses_keep(self, x: Tensor) -> bool:
        mode = self.__dict__.get("_mask_mode", "auto")  # self.mask_mode without the property call
        return mode == "keep" or (mode == "auto" and KEEP_BY_DEFAULT.get(x.device.type, False))

    def _masked_weight(self) -> Tensor:
        mask = self.mask().to(self.weight.dtype)
        if mask.dim() != self.weight.dim():
            mask = mask.reshape((-1,) + (1,) * (self.weight.dim() - 1))
        return self.weight.detach() * mask

    @classmethod
    def _wrap(cls, module: nn.Module, attributes: tuple, granularity, density, threshold, estimator, temperature,
              score_init, freeze_weights):
        """A masked layer sharing ``module``'s parameters (never copied or changed) and attributes."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.train(module.training)  # the module's mode (nn.Module starts in train): conv + BN fuse in eval
        for name in attributes:
            setattr(layer, name, getattr(module, name))
        layer.weight = module.weight
        layer.register_parameter("bias", module.bias)  # a None bias too, as nn.Linear registers it
        if score_init is None:
            score_init = "kaiming" if granularity == "weight" else "zeros"
        layer._init_mask(granularity, density, threshold, estimator, temperature, score_init)
        if freeze_weights:
            layer.weight.requires_grad_(False)
            if layer.bias is not None:
                layer.bias.requires_grad_(False)
        return layer

    def _bake_into(self, dense: nn.Module) -> nn.Module:
        """Copy the masked weight and the bias into a freshly built plain module, in this layer's train
        or eval mode (an eval conv beside an eval BatchNorm is what fuse_modules takes)."""
        with torch.no_grad():
            dense.weight.copy_(self._masked_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense.train(self.training)

    def _mask_repr(self) -> str:
        """What the masked layer adds to its dense repr; the temperature only where the estimator reads it,
        the mask mode and the scope only when not the default."""
        extra = f", temperature={self.temperature}" if self.estimator == "sigmoid" else ""
        extra += f", mask_mode={self.mask_mode}" if self.mask_mode != "auto" else ""
        extra += ", scope=global" if self.global_selector is not None else ""
        return f", granularity={self.granularity}, {self._rule_repr()}{extra}"


class MaskedLinear(nn.Linear, _MaskedLayer):
    """nn.Linear whose weight is masked by top-k (density) or thresholded learnable scores.

    ``mask_mode`` (:data:`MASK_MODES`, settable later) picks how the mask reaches the op. Under
    torch.autocast it computes in the autocast dtype, as nn.Linear (the scores keep theirs).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, granularity: str = "weight",
                 density: Optional[float] = None, threshold: Optional[float] = None, estimator: str = "ste",
                 temperature: float = 1.0, score_init: Union[str, float] = "kaiming", mask_mode: str = "auto",
                 device=None, dtype=None):
        _checks.check_dtype(dtype)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_mask(granularity, density, threshold, estimator, temperature, score_init)
        self.mask_mode = mask_mode

    @classmethod
    def from_dense(cls, module: nn.Linear, granularity: str = "weight", *, density: Optional[float] = None,
                   threshold: Optional[float] = None, estimator: str = "ste", temperature: float = 1.0,
                   score_init: Union[str, float, None] = None, freeze_weights: bool = True) -> "MaskedLinear":
        """Wrap an existing nn.Linear (:func:`check_dense`); its parameters are shared, never copied or changed."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"module must be an nn.Linear, got {type(module).__name__}")
        check_dense(module, nn.Linear)
        return cls._wrap(module, ("in_features", "out_features"), granularity, density, threshold, estimator,
                         temperature, score_init, freeze_weights)

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + self._mask_repr()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation of the weight and bias, then the scores' (deferred initialisation,
        to_empty after building on the meta device, calls it on every module)."""
        super().reset_parameters()
        self._reset_scores()

    def forward(self, input: Tensor) -> Tensor:  # nn.Linear's name: layer(input=x) works as there
        if isinstance(input, fx.Proxy):
            return self._fx_node(input)
        if not isinstance(input, Tensor) or input.is_nested or input.dim() == 0 or input.shape[-1] != self.in_features:
            # named before the selection runs (torch's nested dispatch failed without naming it)
            _checks.check_masked_linear(input, self.weight, self.bias, self.scores)
        scores = self.scores
        x, weight, bias = _autocast(input, self.weight, self.bias)
        if self._uses_keep(x):
            return _ops.masked_linear_keep(x, weight, bias, scores, self._keep(scores), self.estimator,
                                           self.temperature)
        native = _ops._native_layer_op("masked_linear", x)
        thr, cut = self._selection(scores, _fused_check(native, self.threshold))
        return _ops.masked_linear.run(native, x, weight, bias, scores, thr, cut, self.estimator, self.temperature)

    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with the current mask baked into its weight."""
        return self._bake_into(nn.Linear(self.in_features, self.out_features, self.bias is not None,
                                         device=self.weight.device, dtype=self.weight.dtype))


class MaskedConv2d(nn.Conv2d, _MaskedLayer):
    """nn.Conv2d (zero padding: numbers, "valid" or a symmetric "same") whose weight is masked by top-k or
    thresholded learnable scores.

    ``mask_mode`` as in :class:`MaskedLinear`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, granularity: str = "weight", density: Optional[float] = None,
                 threshold: Optional[float] = None, estimator: str = "ste", temperature: float = 1.0,
                 score_init: Union[str, float] = "kaiming", mask_mode: str = "auto", padding_mode: str = "zeros",
                 device=None, dtype=None):
        _checks.check_dtype(dtype)
        _check_padding_mode(padding_mode)
        super().__init__(in_channels, out_channels, kernel_size, stride,
                         _numeric_padding(padding, kernel_size, stride, dilation), dilation, groups, bias,
                         device=device, dtype=dtype)
        self._init_mask(granularity, density, threshold, estimator, temperature, score_init)
        self.mask_mode = mask_mode

    @classmethod
    def from_dense(cls, module: nn.Conv2d, granularity: str = "weight", *, density: Optional[float] = None,
                   threshold: Optional[float] = None, estimator: str = "ste", temperature: float = 1.0,
                   score_init: Union[str, float, None] = None, freeze_weights: bool = True) -> "MaskedConv2d":
        """Wrap an existing nn.Conv2d (:func:`check_dense`); its parameters are shared, never copied or changed."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"module must be an nn.Conv2d, got {type(module).__name__}")
        check_dense(module, nn.Conv2d)
        padding = _pair(_numeric_padding(module.padding, module.kernel_size, module.stride, module.dilation))
        attributes = ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups", "transposed",
                      "output_padding", "padding_mode", "_reversed_padding_repeated_twice")
        layer = cls._wrap(module, attributes, granularity, density, threshold, estimator, temperature, score_init,
                          freeze_weights)
        layer.padding = padding
        return layer

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + self._mask_repr()

    def reset_parameters(self) -> None:
        """nn.Conv2d's initialisation of the weight and bias, then the scores' (deferred initialisation,
        to_empty after building on the meta device, calls it on every module)."""
        super().reset_parameters()
        self._reset_scores()

    def forward(self, input: Tensor) -> Tensor:  # nn.Conv2d's name, as MaskedLinear's
        if isinstance(input, fx.Proxy):
            return self._fx_node(input)
        if not isinstance(input, Tensor) or input.is_nested:  # torch's nested dispatch failed without naming it
            _checks.check_tensor(input, "x")
        if input.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self.forward(input.unsqueeze(0)).squeeze(0)
        geometry = (list(self.stride), list(self.padding), list(self.dilation), self.groups)
        if input.dim() != 4 or input.shape[1] != self.in_channels:  # named before the selection runs
            _checks.check_masked_conv2d(input, self.weight, self.bias, self.scores, None, None, *geometry)
        scores = self.scores
        x, weight, bias = _autocast(input, self.weight, self.bias)
        if self._uses_keep(x):
            return _ops.masked_conv2d_keep(x, weight, bias, scores, self._keep(scores), *geometry, self.estimator,
                                           self.temperature)
        native = _ops._native_layer_op("masked_conv2d", x)
        thr, cut = self._selection(scores, _fused_check(native, self.threshold))
        return _ops.masked_conv2d.run(native, x, weight, bias, scores, thr, cut, *geometry, self.estimator,
                                      self.temperature)

    def to_dense(self) -> nn.Conv2d:
        """A plain nn.Conv2d with the current mask baked into its weight."""
        return self._bake_into(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                         self.padding, self.dilation, self.groups, self.bias is not None,
                                         device=self.weight.device, dtype=self.weight.dtype))
