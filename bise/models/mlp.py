"""The Multi-Color MNIST MLP (LfF / DebiAN): in -> 100 -> 100 -> 100 (ReLU each) -> fc.

``input_scale`` multiplies the flattened input first: 1/255 reproduces the official Multi-Color
MNIST pipeline, whose MLP divides inputs that are already in [0, 1] by 255 again (parity runs).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .scaling import scaled


class MLP(nn.Module):
    """features.fc1/relu1 ... fc3/relu3 (the gated ReLUs), then classifier (the head)."""

    bise_gate_exclude: tuple = ()

    def __init__(self, num_classes: int, in_features: int, width: float = 1.0, hidden: int = 100,
                 input_scale: float = 1.0):
        super().__init__()
        self.input_scale = float(input_scale)
        h = scaled(hidden, width, "mlp")
        self.features = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(in_features, h)), ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(h, h)), ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(h, h)), ("relu3", nn.ReLU()),
        ]))
        self.classifier = nn.Linear(h, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        return self.classifier(self.features(x if self.input_scale == 1.0 else x * self.input_scale))
