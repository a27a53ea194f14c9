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
    benchmarks), so disjointness of the splits can be checked; it is None for user data. b may be
    None where bias labels are unknown (the label-free variant). Checked on construction: a float x
    would otherwise be divided by 255 a second time by inputs().
    """

    x: torch.Tensor
    y: torch.Tensor
    b: Optional[torch.Tensor]
    src: Optional[torch.Tensor] = None

    def __post_init__(self):
        x = self.x
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Split.x must be a uint8 tensor (N, C, H, W) of 0..255 pixel values, got {what} "
                             "(inputs() divides by 255)")
        for name, dims in (("y", (1,)), ("b", (1, 2)), ("src", (1,))):
            t = getattr(self, name)
            if t is None:
                continue
            integer = isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() \
                and t.dtype != torch.bool
            if not integer or t.dim() not in dims:  # a float b was truncated (0.5 -> 0) by the extraction
                what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"Split.{name} must be an integer tensor of shape (N,)"
                                 + (" or (N, 2)" if 2 in dims else "") + f", got {what}")
            if len(t) != len(x):
                raise ValueError(f"Split.{name} has {len(t)} rows, Split.x {len(x)} images")
            if name != "src" and len(t) and int(t.min()) < 0:
                raise ValueError(f"Split.{name} holds a negative label ({int(t.min())}); labels are 0..K-1")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        b = None if self.b is None else tuple(self.b.shape)
        return f"Split(n={len(self)}, x={tuple(self.x.shape)} {self.x.dtype}, b={b})"

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
        return Split(self.x[index], self.y[index], None if self.b is None else self.b[index], src)


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
