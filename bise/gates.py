"""Put BISE gates into any nn.Module, find them again, switch their mode; find the bottleneck.

A gate multiplies the OUTPUT of an activation module channel-wise (docs/method.md section 3):
``Gated(activation, ChannelGate(C))`` replaces the activation in place, so the gated model keeps
the original module names plus ``.activation`` / ``.gate``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from bise_kernels import ChannelGate
from bise_kernels.nn.model import keep_modular_path, matches, refuse_unmatched, restore_fused_path

from . import validate

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.Tanh, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Sigmoid,
               nn.Mish, nn.SELU, nn.CELU, nn.PReLU, nn.Softplus, nn.Hardtanh)
MODES = ("vanilla", "masked", "pruned")


class Gated(nn.Module):
    """``gate(activation(x))``: one hard 0/1 gate per channel on an activation's output."""

    def __init__(self, activation: nn.Module, gate: ChannelGate):
        super().__init__()
        self.activation = activation
        self.gate = gate

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(self.activation(x))


def _example_input(model: nn.Module, example_input: Optional[Tensor]) -> Tensor:
    if example_input is not None:
        return example_input
    spec = getattr(model, "bise_spec", None)
    if isinstance(spec, dict) and "input_shape" in spec:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        return torch.zeros(2, *spec["input_shape"], device=device)
    raise ValueError("example_input is needed to find the channel count of each gate (one forward pass); "
                     "pass a batch of inputs shaped like the model's data")


CHANNEL_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm)
_CHANNEL_LAST = (nn.Linear, nn.LayerNorm)
_ELEMENTWISE = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "__sub__", "__rsub__", "mul", "mul_",
                "__mul__", "__rmul__", "__imul__", "div", "__truediv__", "dropout", "clone", "contiguous",
                # the functional activations (the modules' own calls too): F.gelu of a conv output is a map
                "relu", "relu_", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardtanh_", "leaky_relu",
                "leaky_relu_", "elu", "elu_", "selu", "celu", "hardswish", "hardsigmoid", "mish", "softplus",
                "prelu"}


_CONCAT = {"cat", "concat", "concatenate"}
_FOLLOWED = _ELEMENTWISE | _CONCAT


class _FollowMaps(TorchFunctionMode):
    """Adds to each list of ``maps`` the result of an elementwise op on one of its tensors (same shape), or
    of a torch.cat of its tensors alone: a residual add of (N, C, L) conv outputs is (N, C, L) too, and so
    is an Inception / DenseNet-style cat of them."""

    def __init__(self, maps: dict[int, list]):
        super().__init__()
        self.maps = maps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", None)
        if not isinstance(out, Tensor) or name not in _FOLLOWED:
            return out
        for tensors in self.maps.values():
            def known(a):
                return isinstance(a, Tensor) and any(a is t for t in tensors)
            if (name in _ELEMENTWISE and any(known(a) and a.shape == out.shape for a in args)) or (
                    name in _CONCAT and args and isinstance(args[0], (list, tuple)) and args[0]
                    and all(known(a) for a in args[0])):
                tensors.append(out)
        return out


def trace_calls(model: nn.Module, example_input: Tensor, modules: dict[str, nn.Module]):
    """One no-grad eval forward: per name, the output shapes it produced (in call order), the call order,
    and the channel dim of the names whose input has a known layout: 1 for the 3-d output of a conv or a
    BatchNorm / InstanceNorm / GroupNorm (an (N, C, L) map; a 3-d Linear output has its channels on 2),
    3 for the 4-d output of a Linear or a LayerNorm (an (N, H, W, C) map: a ConvNeXt block's permuted
    features; other 4-d outputs are (N, C, H, W)), also through elementwise ops of such."""
    outputs: dict[str, list] = {name: [] for name in modules}
    order: list[str] = []
    maps: dict[int, list] = {1: [], 3: []}  # kept alive so that `is` compares them
    layouts: dict[str, int] = {}
    handles = []
    for name, m in modules.items():
        def hook(_m, _inp, out, name=name):
            outputs[name].append(tuple(out.shape) if isinstance(out, Tensor) else None)
            order.append(name)

        def pre_hook(_m, inp, name=name):
            for dim, tensors in maps.items():
                if inp and any(inp[0] is t for t in tensors):
                    layouts[name] = dim
        handles += [m.register_forward_hook(hook), m.register_forward_pre_hook(pre_hook)]
    for m in model.modules():
        for layers, rank, dim in ((CHANNEL_FIRST, 3, 1), (_CHANNEL_LAST, 4, 3)):
            if isinstance(m, layers):
                handles.append(m.register_forward_hook(
                    lambda _m, _inp, out, rank=rank, dim=dim:
                    maps[dim].append(out) if isinstance(out, Tensor) and out.dim() == rank else None))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), _FollowMaps(maps):
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return outputs, order, layouts


def _channel_dim(name: str, shape: tuple, layout: Optional[int]) -> int:
    """The dim a gate of ``name``'s output scales: ``layout`` (trace_calls) where its input tells it."""
    if len(shape) == 2:
        return 1
    if len(shape) == 3:
        return 1 if layout == 1 else 2
    if len(shape) == 4:
        return 3 if layout == 3 else 1
    raise ValueError(f"cannot gate {name!r}: its output has shape {shape}; gates need (N, C), (N, C, H, W), "
                     "(N, L, C) outputs, (N, C, L) ones of a conv or BatchNorm, or (N, H, W, C) ones of a Linear")


def _default_exclude(model: nn.Module, candidates: dict[str, nn.Module], order: list[str]) -> tuple:
    """The stem's activations: ``model.bise_gate_exclude``, else (torchvision-ResNet style) those that are
    direct children of the root and run before the first deeper one (in ``order``, the trace's call order);
    a root activation that runs after a deeper one (e.g. between the features and the classifier) is gated."""
    declared = getattr(model, "bise_gate_exclude", None)
    if declared is not None:
        return tuple(declared)
    calls = [n for n in order if n in candidates]
    deeper = next((i for i, n in enumerate(calls) if "." in n), None)
    return () if deeper is None else tuple(dict.fromkeys(calls[:deeper]))


def insert_gates(model: nn.Module, names: Optional[Sequence[str]] = None, *, exclude: Optional[Sequence[str]] = None,
                 example_input: Optional[Tensor] = None, temperature: float = 1.0,
                 bottleneck: Optional[str] = None, arg_names: tuple = ("names", "exclude")) -> dict[str, ChannelGate]:
    """Wrap activation modules in :class:`Gated`, in place; return {qualified name: ChannelGate}.

    ``names`` (fnmatch patterns over qualified module names) picks the modules to gate; by default
    every activation module (``ACTIVATIONS``) except the stem (``model.bise_gate_exclude`` for the
    built-ins) and anything run after the bottleneck (the head). ``exclude`` removes more.
    A pattern of ``names`` that matches no module, or of ``exclude`` that matches none of the modules
    it could remove, is a ValueError naming it (a typo would otherwise keep a layer gated); the
    errors call the two arguments ``arg_names`` (ExtractConfig's gate_names / gate_exclude).
    The channel count is read from one forward pass on ``example_input`` (built-in models make
    their own). A module that runs more than once per forward cannot carry a gate.
    """
    names, exclude = (validate.patterns(arg, value) for arg, value in zip(arg_names, (names, exclude)))
    if gates_of(model):
        raise ValueError("the model already has gates (Gated modules); insert them once")
    x = _example_input(model, example_input)
    if names is None:
        candidates = {n: m for n, m in model.named_modules() if n and isinstance(m, ACTIVATIONS)}
    else:
        modules = [n for n, _ in model.named_modules() if n]
        refuse_unmatched(arg_names[0], names, modules, f"module of {type(model).__name__}")
        candidates = {n: m for n, m in model.named_modules() if n and matches(n, names)}
    if exclude is not None:
        cls = type(model).__name__
        what = f"activation module of {cls}" if names is None else f"module of {cls} picked by {arg_names[0]}"
        refuse_unmatched(arg_names[1], exclude, list(candidates), what)
    # the head (where the default gates stop): the bottleneck named, else the Linear that runs last, found
    # in the same trace as the candidates' shapes
    head = find_bottleneck(model, bottleneck) if names is None and bottleneck is not None else None
    linears = _linears(model) if names is None and bottleneck is None else {}
    tracked = {**candidates, **linears}
    if head is not None:
        tracked[head] = model.get_submodule(head)
    outputs, order, layouts = trace_calls(model, x, tracked)
    default_exclude = _default_exclude(model, candidates, order) if names is None else ()
    candidates = {n: m for n, m in candidates.items() if not matches(n, default_exclude) and not matches(n, exclude)}
    if linears:
        head = _last_run(model, order, linears)
    if head is not None and head in order:
        first_head_call = order.index(head)
        candidates = {n: m for n, m in candidates.items() if n not in order[first_head_call:]}
    planned = []  # every module checked before the model is changed: an error leaves it as it was
    for name, module in candidates.items():
        shapes = outputs[name]
        if len(shapes) > 1:
            raise ValueError(f"module {name!r} runs {len(shapes)} times per forward (a shared activation); give "
                             "each place its own module instance or exclude it")
        if not shapes:
            continue  # never called on this input: nothing to gate
        shape = shapes[0]
        if shape is None:
            raise ValueError(f"cannot gate {name!r}: it does not return a tensor")
        dim = _channel_dim(name, shape, layouts.get(name))
        planned.append((name, module, ChannelGate(shape[dim], dim=dim, threshold=0.0, estimator="sigmoid",
                                                  temperature=temperature, init=0.0, device=x.device)))
    if not planned:
        raise ValueError(f"no gateable layer in {type(model).__name__}: no activation module ({', '.join(a.__name__ for a in ACTIVATIONS[:6])}, ...) "
                         f"outside the stem and head (excluded: {list(default_exclude) + list(exclude or [])}); "
                         "pass names=[...] to choose modules")
    gates: dict[str, ChannelGate] = {}
    wrapped = []
    for name, module, gate in planned:
        gated = Gated(module, gate)
        model.set_submodule(name, gated)
        gates[name] = gate
        wrapped.append(([name], gated))
    keep_modular_path(model, wrapped)  # a TransformerEncoderLayer's fused path runs its activation itself
    return gates


def _linears(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _last_run(model: nn.Module, order: list[str], linears: dict[str, nn.Module]) -> str:
    """The last of ``linears`` in a trace's call ``order`` (the head), or a ValueError if none ran."""
    ran = [n for n in order if n in linears]
    if not ran:
        raise ValueError(f"cannot find the bottleneck of {type(model).__name__}: none of its nn.Linear modules "
                         f"({list(linears)}) runs in its forward; pass bottleneck=NAME, the module whose input is "
                         "the feature the auxiliary head reads")
    return ran[-1]


def gates_of(model: nn.Module) -> dict[str, ChannelGate]:
    """The gates already in ``model``, keyed by the qualified name of their Gated module."""
    return {n: m.gate for n, m in model.named_modules() if isinstance(m, Gated)}


def remove_gates(model: nn.Module) -> nn.Module:
    """Put the original activation modules back (in place); returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Gated):
            model.set_submodule(name, m.activation)
    restore_fused_path(model)
    return model


def set_gate_mode(gates: dict[str, ChannelGate], mode: str) -> None:
    """"vanilla": gates off (identity); "masked": hard gates, scores trainable; "pruned": hard, frozen."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    for gate in gates.values():
        gate.enabled = mode != "vanilla"
        gate.scores.requires_grad_(mode == "masked")


def find_bottleneck(model: nn.Module, name: Optional[str] = None, example_input: Optional[Tensor] = None) -> str:
    """Qualified name of the module whose INPUT is the bottleneck feature: ``name`` if given, else the
    nn.Linear that runs last in a forward on ``example_input`` (the head; one no-grad eval forward),
    else, without an input, the last nn.Linear registered. A model may register its head first
    (``self.fc`` in ``__init__`` before the feature layers): the registration order then named a
    feature layer, and the auxiliary head read the wrong activation."""
    modules = dict(model.named_modules())
    linears = _linears(model)
    if name is not None:
        if name not in modules or name == "":
            raise ValueError(f"bottleneck {name!r} is not a module of {type(model).__name__} "
                             f"(its Linear modules: {list(linears)})")
        return name
    if not linears:
        raise ValueError(f"cannot find the bottleneck of {type(model).__name__}: it has no nn.Linear; pass "
                         "bottleneck=NAME, the module whose input is the feature the auxiliary head reads")
    if example_input is None:
        return list(linears)[-1]
    return _last_run(model, trace_calls(model, example_input, linears)[1], linears)


__all__ = ["ACTIVATIONS", "Gated", "find_bottleneck", "gates_of", "insert_gates", "remove_gates", "set_gate_mode",
           "trace_calls"]
