"""Cost of a model: MACs (torch.utils.flop_counter.FlopCounterMode over the modules actually run),
parameter count and measured latency (docs/method.md section 11)."""

from __future__ import annotations

import statistics
import time
from typing import Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

COUNTER = "torch.utils.flop_counter.FlopCounterMode, MACs = FLOPs / 2"


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_shape(input_shape: Sequence[int]) -> tuple:
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"input_shape must be positive ints (C, H, W) without the batch, got {input_shape!r}")
    return shape


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: Sequence[int]) -> float:
    """Millions of multiply-accumulates for one input of ``input_shape`` (conv, linear and matmuls run
    by the model in eval mode); the paper's "MFLOPs" (414.9 for SimpleConvNet on 3x28x28)."""
    shape = _check_shape(input_shape)
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    # Attention as plain matmuls, which the counter sees: nn.MultiheadAttention's eval fast path and the
    # fused scaled_dot_product_attention kernels of the CPU counted 0 (a ViT's MACs were those of its MLPs).
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        x = torch.zeros((1,) + shape, device=_device_of(model))
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            model(x)
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops() / 2 / 1e6


def count_params(model: nn.Module) -> int:
    """Number of parameters (all of them: weights, biases, BN affine), not buffers."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: Sequence[int], batch_size: int = 1, device="cpu",
                    repeats: int = 20, warmup: int = 3) -> float:
    """Median wall-clock seconds of one eval forward pass on a batch of ``batch_size`` random inputs (drawn
    from a generator of their own: the caller's global RNG state is left as it was)."""
    shape = _check_shape(input_shape)
    for name, v in (("batch_size", batch_size), ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    device = torch.device(device)
    was_training, original = model.training, _device_of(model)
    model.eval().to(device)
    x = torch.rand((batch_size,) + shape, generator=torch.Generator().manual_seed(0)).to(device)  # not the caller's RNG
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - start)
    finally:
        model.to(original).train(was_training)
    return statistics.median(times)
