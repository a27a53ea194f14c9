"""The two containers every loader returns: a Split of (image, target, bias) and a BiasedDataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch


@dataclass(eq=False)
class Split:
    """One split: uint8 images (N, C, H, W), int64 targets y (N,), int64 bias labels b.

    b is (N,) for one bias or (N, num_biases) for two-bias data. A sample is bias-aligned iff
    y == b (per bias). src, when known, is the index of each sample's source image (built-in
    benchmarks), so disjointness of the splits can be checked; it is None for user data.
    """

    x: torch.Tensor
    y: torch.Tensor
    b: torch.Tensor
    src: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"Split(n={len(self)}, x={tuple(self.x.shape)} {self.x.dtype}, b={tuple(self.b.shape)})"

    def inputs(self, index=None) -> torch.Tensor:
        """float32 images in [0, 1], (n, C, H, W); index: slice, index tensor, or None for all."""
        x = self.x if index is None else self.x[index]
        return x.to(torch.float32, copy=True).div_(255.0)

    def aligned(self) -> torch.Tensor:
        """bool (N,) or (N, num_biases): whether y equals the bias label (per bias)."""
        return self.b == (self.y if self.b.dim() == 1 else self.y[:, None])

    def subset(self, index) -> "Split":
        """The samples at index (slice, bool mask or index tensor), as a new Split."""
        src = None if self.src is None else self.src[index]
        return Split(self.x[index], self.y[index], self.b[index], src)


@dataclass(eq=False)
class BiasedDataset:
    """Train / val / test splits plus what the BISE method needs to know about the bias.

    weighting names the reweighting scheme the paper would use for such data:
    "symmetric-rho" (rho known, BiasedMNIST / Corrupted CIFAR-10 style), "group-balanced"
    (CelebA / Waterbirds style, from training group counts) or "two-bias" (Multi-Color MNIST).
    mask_train, when set, is a second draw of the training set (same source images, fresh bias
    labels and rendering) on which the fresh-draw protocol learns the masks (bise.data.maskset).
    """

    name: str
    train: Split
    val: Optional[Split]
    test: Split
    num_classes: int
    num_bias_classes: int
    num_biases: int
    rho: Optional[Union[float, tuple]]
    weighting: str
    spec: str
    info: dict = field(default_factory=dict)
    mask_train: Optional[Split] = None  # a second draw of train (bise.data.maskset); None: none yet

    @property
    def input_shape(self) -> tuple:
        """(C, H, W) of every image."""
        return tuple(self.train.x.shape[1:])
