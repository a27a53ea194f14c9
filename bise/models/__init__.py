"""Built-in architectures: build_model, model_spec (the description saved beside weights), rebuild.

Every activation that may carry a gate is its own module instance, so that gates.insert_gates can
wrap it; each class names the activations that are NOT gated by default (the stem) in
``bise_gate_exclude``.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

from torch import nn

from .. import validate
from .mlp import MLP
from .mobilenetv2 import MobileNetV2
from .pretrained import Pretrained, PretrainedError, load_imagenet_weights
from .resnet import STEMS, ResNet18
from .simple_cnn import SimpleCNN

ARCHS = ("simple-cnn", "mlp", "resnet18", "mobilenetv2")


def build_model(arch: str, num_classes: int, input_shape: Sequence[int], *, width: float = 1.0,
                pretrained: Pretrained = False, stem: Optional[str] = None,
                input_scale: Optional[float] = None) -> nn.Module:
    """A freshly initialised built-in model; ``input_shape`` is (C, H, W) of one input.

    ``stem`` (resnet18 only): "cifar" or "imagenet"; default "cifar" for inputs up to 64 pixels
    high and not pretrained, else "imagenet". ``pretrained`` (resnet18, mobilenetv2; width 1, 3
    input channels): torchvision's ImageNet weights, True for the installed copy or the path of the
    file (bise/models/pretrained.py); resnet18 gets a new ``fc`` unless it has 1000 classes.
    ``input_scale`` (mlp only): a factor on the flattened input (1/255: the official Multi-Color
    MNIST pipeline's double scaling, for parity runs; default 1).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    num_classes = validate.as_int("num_classes", num_classes, 2)
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
    width = validate.as_positive("width", width)
    pretrained = False if pretrained is None else pretrained
    if not isinstance(pretrained, (bool, str, os.PathLike)):
        raise TypeError(f"pretrained must be a bool or the path of a weights file, got {type(pretrained).__name__}")
    if pretrained is not False and arch not in ("resnet18", "mobilenetv2"):
        raise PretrainedError(f"pretrained (ImageNet weights) is available for resnet18 and mobilenetv2, not {arch!r}")
    if pretrained is not False and (input_shape[0] != 3 or width != 1.0):
        raise PretrainedError(f"pretrained {arch} needs 3 input channels and width=1.0, got {input_shape[0]} and "
                              f"{width}")
    if pretrained is not False and arch == "mobilenetv2" and num_classes != 1000:
        raise PretrainedError(f"pretrained mobilenetv2 needs num_classes=1000 (its ImageNet classifier), got "
                              f"{num_classes}")
    if stem is not None and arch != "resnet18":
        raise ValueError(f"stem is a resnet18 option, got stem={stem!r} for arch {arch!r}")
    if input_scale is not None:
        if arch != "mlp":
            raise ValueError(f"input_scale is an mlp option, got input_scale={input_scale!r} for arch {arch!r}")
        if not (isinstance(input_scale, (int, float)) and math.isfinite(input_scale) and input_scale > 0):
            raise ValueError(f"input_scale must be a positive number, got {input_scale!r}")
    channels = input_shape[0]
    spec = {"arch": arch, "num_classes": num_classes, "input_shape": list(input_shape), "width": float(width)}
    if arch == "simple-cnn":
        model = SimpleCNN(num_classes, channels, width)
    elif arch == "mlp":
        model = MLP(num_classes, math.prod(input_shape), width, input_scale=input_scale or 1.0)
        if input_scale is not None:
            spec["input_scale"] = float(input_scale)
    elif arch == "resnet18":
        stem = stem or ("cifar" if input_shape[1] <= 64 and pretrained is False else "imagenet")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if stem != "imagenet" and pretrained is not False:
            raise PretrainedError(f"pretrained resnet18 needs stem='imagenet' (the ImageNet weights' 7x7 conv1), got "
                                  f"{stem!r}")
        spec["stem"] = stem
        model = ResNet18(num_classes, channels, width, stem)
    else:
        model = MobileNetV2(num_classes, channels, width)
    if pretrained is not False:
        load_imagenet_weights(model, arch, pretrained)
    model.bise_spec = spec
    return model


def reinitialize(model: nn.Module) -> nn.Module:
    """Fresh weights in place, as the constructor draws them: every submodule's reset_parameters(),
    then the architecture's own initialisation (``init_weights``, e.g. SimpleCNN's Kaiming init)."""
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for m in model.modules():
        if hasattr(m, "init_weights"):
            m.init_weights()
    return model


def model_spec(model: nn.Module) -> dict:
    """The architecture description of a built-in model (JSON-able), enough for :func:`rebuild`."""
    spec = getattr(model, "bise_spec", None)
    if not isinstance(spec, dict):
        raise ValueError(f"{type(model).__name__} was not made by bise.models.build_model, so it has no "
                         "architecture description; save and rebuild it yourself")
    return dict(spec, input_shape=list(spec["input_shape"]))


def rebuild(spec: dict) -> nn.Module:
    """A fresh (randomly initialised) model from :func:`model_spec`'s description; load weights after."""
    missing = [k for k in ("arch", "num_classes", "input_shape") if k not in spec] if isinstance(spec, dict) else []
    if not isinstance(spec, dict) or missing:
        raise ValueError(f"spec must be a dict from model_spec() with the keys 'arch', 'num_classes' and "
                         f"'input_shape', got {spec!r}")
    kwargs = {k: v for k, v in spec.items() if k not in ("arch", "num_classes", "input_shape")}
    return build_model(spec["arch"], spec["num_classes"], spec["input_shape"], **kwargs)


__all__ = ["ARCHS", "MLP", "MobileNetV2", "ResNet18", "SimpleCNN", "build_model", "model_spec", "rebuild",
           "reinitialize"]
