"""The gated part of a chain-shaped network, run forward and back to the gate scores without autograd.

A mask step (bise/extract.py) runs the network after the frozen prefix and backpropagates to the
gate scores only. Every weight is frozen, so the work autograd does there is a fixed sequence of
ATen calls; on small networks the per-call host cost of building and walking the graph (and of
the custom gate op's Python dispatch) is most of the step. :class:`GatedChain` makes the same
calls directly: each module's forward op, and in backward the kernels autograd's nodes call
(``mm`` for a Linear's input, ``convolution_backward``, ``native_batch_norm_backward``,
``threshold_backward``, ``tanh_backward``, the mean's expand-and-divide, the gate's backend
kernel), so the score gradients are autograd's bit for bit. :meth:`GatedChain.build` checks
that on an example batch and returns None when the model is not such a chain.

Supported chains: each module's input is the previous module's output (or its ``flatten(1)``);
modules Gated(ReLU | Tanh), ReLU, Tanh, Linear (2-d input), Conv2d (zero padding), BatchNorm2d
(eval, running statistics), AdaptiveAvgPool2d(1); the last module is the bottleneck Linear.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bise_kernels import backends

from .feature_cache import FrozenPrefix
from .gates import Gated

_ACTIVATIONS = (nn.ReLU, nn.Tanh)


def _activation_forward(act: nn.Module, x: Tensor) -> Tensor:
    return torch.relu(x) if isinstance(act, nn.ReLU) else torch.tanh(x)


def _activation_backward(act: nn.Module, g: Tensor, y: Tensor) -> Tensor:
    """ReluBackward0 / TanhBackward0: both read the activation's output."""
    if isinstance(act, nn.ReLU):
        return torch.ops.aten.threshold_backward(g, y, 0)
    return torch.ops.aten.tanh_backward(g, y)


class _Stage:
    """One module of the chain: ``forward(x) -> (y, saved)``; ``backward(g, saved) -> dL/dx``."""

    gate = None

    def __init__(self, module: nn.Module):
        self.module = module


class _Linear(_Stage):
    def forward(self, x):
        return F.linear(x, self.module.weight, self.module.bias), x

    def backward(self, g, x):
        w = self.module.weight
        if x.stride(0) == 1 and x.stride(1) == x.size(0):  # mm_mat1_backward's column-major case
            return w.t().mm(g.t()).t()
        return g.mm(w)


class _Conv2d(_Stage):
    def forward(self, x):
        m = self.module
        return F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups), x

    def backward(self, g, x):
        m = self.module
        bias_sizes = None if m.bias is None else [m.bias.shape[0]]
        return torch.ops.aten.convolution_backward(g, x, m.weight, bias_sizes, list(m.stride), list(m.padding),
                                                   list(m.dilation), False, [0, 0], m.groups,
                                                   [True, False, False])[0]


class _BatchNorm2d(_Stage):
    def forward(self, x):
        m = self.module
        momentum = 0.0 if m.momentum is None else m.momentum
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, m.weight, m.bias, m.running_mean, m.running_var,
                                                           False, momentum, m.eps)
        return y, (x, mean, invstd)

    def backward(self, g, saved):
        m = self.module
        x, mean, invstd = saved
        return torch.ops.aten.native_batch_norm_backward(g, x, m.weight, m.running_mean, m.running_var, mean, invstd,
                                                         False, m.eps, [True, False, False])[0]


class _Activation(_Stage):
    def forward(self, x):
        y = _activation_forward(self.module, x)
        return y, y

    def backward(self, g, y):
        return _activation_backward(self.module, g, y)


class _GlobalAvgPool(_Stage):
    def forward(self, x):
        return x.mean((-1, -2), keepdim=True), x.shape

    def backward(self, g, shape):
        return torch.ops.aten.div.Scalar(g.expand(shape), shape[-1] * shape[-2])  # MeanBackward1


class _Flatten(_Stage):
    def forward(self, x):
        return x.flatten(1), x.shape

    def backward(self, g, shape):
        return g.reshape(shape)


class _Gated(_Stage):
    """``gate(activation(x))`` with the gate's backend kernels (the ones its custom op calls)."""

    def __init__(self, module: Gated, needs_input_grad: bool):
        super().__init__(module)
        self.gate = module.gate
        self.needs = [needs_input_grad, True]

    def forward(self, x):
        gate = self.gate
        a = _activation_forward(self.module.activation, x)
        thr, cut = gate._selection(gate.scores, False)  # the cached pair, not selection()'s copy
        kernel = backends.resolve("channel_gate_forward", a.device.type, a.dtype)[1]
        return kernel(a, gate.scores, thr, cut, gate.dim), (a, thr, cut)

    def backward(self, g, saved):
        """dL/dx (None for the first gate); adds the score gradient to ``gate.scores.grad``."""
        act, gate = self.module.activation, self.gate
        a, thr, cut = saved
        kernel = backends.resolve("channel_gate_backward", a.device.type, a.dtype)[1]
        gx, gs = kernel(g, a, gate.scores, thr, cut, gate.dim, gate.estimator, gate.temperature, self.needs)
        gate.scores.grad.add_(gs)  # AccumulateGrad into the zeroed gradient, as in the autograd step
        return _activation_backward(act, gx, a) if self.needs[0] else None


def _stage(module: nn.Module, after_gate: bool) -> Optional[_Stage]:
    if isinstance(module, Gated):
        if type(module.activation) in _ACTIVATIONS and not getattr(module.activation, "inplace", False):
            return _Gated(module, after_gate)
        return None
    if type(module) is nn.Linear:
        return _Linear(module)
    if type(module) is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
        return _Conv2d(module)
    if type(module) is nn.BatchNorm2d and not module.training and module.running_mean is not None:
        return _BatchNorm2d(module)
    if type(module) in _ACTIVATIONS and not getattr(module, "inplace", False):
        return _Activation(module)
    if type(module) is nn.AdaptiveAvgPool2d and module.output_size in (1, (1, 1)):
        return _GlobalAvgPool(module)
    return None


def _units(model: nn.Module) -> list[nn.Module]:
    """The modules a chain is made of: Gated modules and leaves outside them."""
    units, inside = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, Gated):
            inside.add(name)
            units.append(m)
        elif next(m.children(), None) is None:
            units.append(m)
    return units


def _is_flatten(x: Tensor, prev: Tensor) -> bool:
    return (x.dim() == 2 and prev.dim() > 2 and x.shape == (prev.shape[0], math.prod(prev.shape[1:]))
            and x.data_ptr() == prev.data_ptr() and torch.equal(x, prev.flatten(1)))


class GatedChain:
    """The modules after the frozen prefix up to the bottleneck's input, then the bottleneck Linear."""

    def __init__(self, stages: list[_Stage], head: nn.Linear):
        self.stages, self.head = stages, head
        self.first_gate = next(i for i, s in enumerate(stages) if s.gate is not None)

    @classmethod
    def build(cls, model: nn.Module, prefix: FrozenPrefix, bottleneck: nn.Module, example: Tensor
              ) -> Optional["GatedChain"]:
        """The chain of ``model`` after ``prefix`` (installed), or None when the model is not one.

        ``example``: cached prefix outputs of a few samples; the gates must be in "masked" mode
        (enabled, scores requiring gradients), as during a mask step.
        The chain is used only if its bottleneck features, logits and score gradients on
        ``example`` equal those of the model under autograd bit for bit.
        """
        calls: list = []
        handles = [m.register_forward_hook(lambda m, args, out: calls.append((m, args[0] if args else None, out)))
                   for m in _units(model)]
        try:
            with torch.no_grad():
                logits = prefix.run(example)
        finally:
            for h in handles:
                h.remove()
        start = next((i for i, (_, x, _) in enumerate(calls) if x is example), None)
        if start is None or calls[-1][0] is not bottleneck or calls[-1][2] is not logits \
                or type(bottleneck) is not nn.Linear:
            return None
        stages: list[_Stage] = []
        prev = example
        for m, x, out in calls[start:-1]:
            if x is not prev:
                if not _is_flatten(x, prev):
                    return None
                stages.append(_Flatten(None))
            stage = _stage(m, any(s.gate is not None for s in stages))
            if stage is None:
                return None
            stages.append(stage)
            prev = out
        x = calls[-1][1]
        if x is not prev:
            if not _is_flatten(x, prev):
                return None
            stages.append(_Flatten(None))
        if not any(s.gate is not None for s in stages):
            return None
        chain = cls(stages, bottleneck)
        return chain if chain._matches_autograd(model, prefix, example) else None

    def _matches_autograd(self, model: nn.Module, prefix: FrozenPrefix, example: Tensor) -> bool:
        gates = [s.gate for s in self.stages if s.gate is not None]
        if not all(g.enabled and g.scores.requires_grad for g in gates):
            return False
        z_seen: list = []
        handle = self.head.register_forward_pre_hook(lambda m, args: z_seen.append(args[0]))
        try:
            logits = prefix.run(example)
        finally:
            handle.remove()
        z = z_seen[0]
        seed = torch.randn(z.shape, generator=torch.Generator().manual_seed(0)).to(z)
        expected = torch.autograd.grad(z, [g.scores for g in gates], seed)
        saved_grads = [g.scores.grad for g in gates]
        try:
            for g in gates:
                g.scores.grad = torch.zeros_like(g.scores)
            with torch.no_grad():
                mine = self.forward(example)
                same_logits = torch.equal(F.linear(mine, self.head.weight, self.head.bias), logits)
                same_z = torch.equal(mine, z)
                self.backward(seed)
            got = [g.scores.grad for g in gates]
        finally:
            for g, grad in zip(gates, saved_grads):
                g.scores.grad = grad
        return same_logits and same_z and all(torch.equal(a, b) for a, b in zip(expected, got))

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """The bottleneck features (the head's input) for prefix outputs ``x``; keeps what backward needs."""
        saved = []
        for stage in self.stages:
            x, s = stage.forward(x)
            saved.append(s)
        self.saved = saved
        return x

    def logits(self, z: Tensor) -> Tensor:
        """The bottleneck Linear on ``z`` (differentiable: the losses backpropagate to ``z`` through it)."""
        return F.linear(z, self.head.weight, self.head.bias)

    @torch.no_grad()
    def backward(self, grad_z: Tensor) -> None:
        """Add dL/dscores of every gate to its ``scores.grad`` (zeroed by the caller), given dL/dz."""
        g = grad_z
        for i in range(len(self.stages) - 1, self.first_gate - 1, -1):
            g = self.stages[i].backward(g, self.saved[i])
        self.saved = None


__all__ = ["GatedChain"]
