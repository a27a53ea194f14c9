"""Caching what a frozen network computes again and again during extraction (docs/method.md, "Feature caching").

* :class:`FrozenPrefix`: the modules that run before the first gate never change (frozen weights,
  eval mode), so their output is computed once per split and looked up afterwards. The prefix is
  found by recording execution order: the root's children run before the first child holding a
  gate, descending into that child while it is an ``nn.Sequential``. During replay those modules
  are swapped for stubs (the last returns the cached batch, the others a zero-cost placeholder of
  their recorded shape) and the model gets a placeholder input. One batch is checked against the
  real forward before the cache is used; a model whose forward does not fit is run uncached.
* :class:`BottleneckTap` records the head's input on each forward; ``bise.extract._Run.features``
  uses it to compute the features of a whole split at once, so the head phases train on cached
  features instead of running the network every head epoch.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .gates import Gated


class _StopForward(Exception):
    pass


class _State:
    def __init__(self):
        self.batch: Optional[Tensor] = None


class _Stub(nn.Module):
    """Stands in for a prefix module: the cached batch (last module) or a placeholder (others)."""

    def __init__(self, state: _State, shape: tuple, last: bool):
        super().__init__()
        self.state, self.shape, self.last = state, shape, last

    def forward(self, *args, **kwargs) -> Tensor:
        batch = self.state.batch
        if self.last:
            return batch
        return batch.new_zeros(()).expand(batch.shape[0], *self.shape[1:])


def _contains_gate(module: nn.Module) -> bool:
    return any(isinstance(m, Gated) for m in module.modules())


def _call_order(model: nn.Module, level: nn.Module, example: Tensor) -> Optional[list[tuple[str, nn.Module, tuple]]]:
    """Children of ``level`` in the order one forward of ``model`` calls them, with output shapes."""
    calls: list = []
    handles = [child.register_forward_hook(
        lambda m, i, o, name=name: calls.append((name, m, tuple(o.shape) if isinstance(o, Tensor) else None)))
        for name, child in level.named_children()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    names = [c[0] for c in calls]
    if len(set(names)) != len(names) or any(c[2] is None for c in calls):
        return None  # a child runs twice or returns a non-tensor: not a simple chain
    return calls


def find_prefix(model: nn.Module, example: Tensor) -> list[tuple[nn.Module, str, tuple]]:
    """(parent, child name, output shape) of each module that runs before the first gate."""
    prefix, level = [], model
    while True:
        calls = _call_order(model, level, example)
        if calls is None:
            return []
        first = next((i for i, (_, m, _) in enumerate(calls) if _contains_gate(m)), None)
        if first is None:
            return []
        prefix += [(level, name, shape) for name, _, shape in calls[:first]]
        child = calls[first][1]
        if isinstance(child, Gated) or not isinstance(child, nn.Sequential):
            return prefix
        level = child


class FrozenPrefix:
    """Replays a model from the cached output of its frozen prefix (see the module docstring)."""

    def __init__(self, model: nn.Module, prefix: list, input_shape: tuple):
        self.model, self.prefix, self.input_shape = model, prefix, tuple(input_shape)
        self.state = _State()
        self.originals = [getattr(parent, name) for parent, name, _ in prefix]
        self.installed = False

    @classmethod
    def build(cls, model: nn.Module, example: Tensor, num_samples: int, limit_bytes: float) -> Optional["FrozenPrefix"]:
        """The prefix cache for ``model`` if it has a prefix, fits ``limit_bytes`` and replays exactly."""
        prefix = find_prefix(model, example)
        if not prefix:
            return None
        shape = prefix[-1][2]
        size = num_samples * math.prod(shape[1:]) * example.element_size()
        if size > limit_bytes:
            warnings.warn(f"frozen-prefix cache would take {size / 2**20:.0f} MiB (> {limit_bytes / 2**20:.0f}); "
                          "running the prefix every step instead", stacklevel=3)
            return None
        cache = cls(model, prefix, example.shape[1:])
        with torch.no_grad():
            reference = model(example)
            cached = cache.compute(lambda idx: example[idx], example.shape[0], example.shape[0])
            with cache:
                replayed = cache.run(cached)
        if not torch.allclose(reference, replayed, rtol=1e-5, atol=1e-6):
            warnings.warn("the frozen-prefix replay does not reproduce this model's forward (its forward is not a "
                          "plain chain of modules); running the prefix every step instead", stacklevel=3)
            return None
        return cache

    def compute(self, inputs: Callable[[Tensor], Tensor], n: int, batch_size: int) -> Tensor:
        """The prefix output for samples 0..n-1 (``inputs(index)`` gives their model inputs)."""
        parent, name, _ = self.prefix[-1]
        out: list[Tensor] = []

        def grab(_m, _i, o):
            out.append(o.detach())
            raise _StopForward

        handle = getattr(parent, name).register_forward_hook(grab)
        try:
            with torch.no_grad():
                for idx in torch.arange(n).split(batch_size):
                    try:
                        self.model(inputs(idx))
                    except _StopForward:
                        pass
        finally:
            handle.remove()
        return torch.cat(out)

    def run(self, cached_batch: Tensor) -> Tensor:
        """The model's output for the samples whose prefix output is ``cached_batch`` (stubs installed)."""
        if not self.installed:
            raise RuntimeError("FrozenPrefix.run needs the stubs installed: use `with cache:`")
        self.state.batch = cached_batch
        try:
            return self.model(cached_batch.new_zeros(()).expand(cached_batch.shape[0], *self.input_shape))
        finally:
            self.state.batch = None

    def __enter__(self) -> "FrozenPrefix":
        for i, (parent, name, shape) in enumerate(self.prefix):
            setattr(parent, name, _Stub(self.state, shape, last=i == len(self.prefix) - 1))
        self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        for (parent, name, _), original in zip(self.prefix, self.originals):
            setattr(parent, name, original)
        self.installed = False


class BottleneckTap:
    """Records the input of the bottleneck module (the auxiliary head's features) on every forward."""

    def __init__(self, module: nn.Module):
        self.value: Optional[Tensor] = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _m, args):
        self.value = args[0].flatten(1)

    def take(self) -> Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the bottleneck module did not run during the forward pass")
        return value

    def close(self) -> None:
        self.handle.remove()


__all__ = ["BottleneckTap", "FrozenPrefix", "find_prefix"]
