"""ResNet-18 with torchvision parameter names and one activation module per gate place.

Each BasicBlock has ``relu1`` (on relu(bn1(conv1)), the input of conv2) and ``relu2`` (on the block
output after the residual add): the two gate places of docs/method.md section 3. The stem ReLU
(``relu``) is not gated. ``stem="cifar"``: 3x3 conv, stride 1, no max-pool; ``"imagenet"``: 7x7
stride-2 conv and 3x3 stride-2 max-pool (torchvision).
"""

from __future__ import annotations

from torch import Tensor, nn

from .scaling import scaled

STEMS = ("cifar", "imagenet")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    bise_gate_exclude: tuple = ("relu",)

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0, stem: str = "cifar"):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        widths = [scaled(c, width, "resnet18") for c in (64, 128, 256, 512)]
        cifar = stem == "cifar"
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3 if cifar else 7, 1 if cifar else 2, 1 if cifar else 3,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        inplanes = widths[0]
        for i, planes in enumerate(widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """torchvision's initialisation (after every layer's own): Kaiming normal (fan_out) convs, unit BatchNorm;
        bise.models.reinitialize calls it again."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))
