"""SimpleConvNet of the BiasedMNIST experiments (ReBias / BISE): 4 x [conv 7x7 -> BN -> act], GAP, fc."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .scaling import scaled

BASE_WIDTHS = (16, 32, 64, 128)


class SimpleCNN(nn.Module):
    """Activations ReLU, ReLU, ReLU, Tanh, each its own module (features.relu1 ... features.tanh4)."""

    bise_gate_exclude: tuple = ()

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        widths = [scaled(c, width, "simple-cnn") for c in BASE_WIDTHS]
        acts = [("relu1", nn.ReLU()), ("relu2", nn.ReLU()), ("relu3", nn.ReLU()), ("tanh4", nn.Tanh())]
        layers, cin = [], in_channels
        for i, (cout, (act_name, act)) in enumerate(zip(widths, acts), start=1):
            layers += [(f"conv{i}", nn.Conv2d(cin, cout, 7, padding=3)), (f"bn{i}", nn.BatchNorm2d(cout)),
                       (act_name, act)]
            cin = cout
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming-normal convolutions (fan_out) and BatchNorm 1 / 0, as ReBias; the conv biases start at
        zero (ReBias keeps PyTorch's default; a bias followed by BatchNorm changes no output)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))
