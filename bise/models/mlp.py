"""The Multi-Color MNIST MLP (LfF / DebiAN): in -> 100 -> 100 -> 100 (ReLU each) -> fc."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


class MLP(nn.Module):
    """features.fc1/relu1 ... fc3/relu3 (the gated ReLUs), then classifier (the head)."""

    bise_gate_exclude: tuple = ()

    def __init__(self, num_classes: int, in_features: int, width: float = 1.0, hidden: int = 100):
        super().__init__()
        h = max(1, round(hidden * width))
        self.features = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(in_features, h)), ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(h, h)), ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(h, h)), ("relu3", nn.ReLU()),
        ]))
        self.classifier = nn.Linear(h, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x.flatten(1)))
