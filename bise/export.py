"""Export a gated model as a plain, physically smaller nn.Module (docs/method.md section 15).

Dead channels are removed with Torch-Pruning's DependencyGraph, which finds every coupled layer
(producer filters, BN entries, consumer input slices, residual adds, depthwise convs, flatten).
Kept by hand here: which channels may go (a coupled group loses a channel only if every gate of
the group kills it and every consumer of the group reads a constant there, so an ungated source
such as a ResNet stem keeps its stream), folding non-zero constants into consumer biases, the
0/1 channel scale that keeps a residual union exact, BN folding, rounding, and the exactness
check against the masked model.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Mapping, Optional

import torch
import torch_pruning as tp
from torch import Tensor, nn

from bise_kernels.nn import ChannelGate
from bise_kernels.nn.model import keep_modular_path, restore_fused_path

from .checkpoint import save_atomic
from .gates import CHANNEL_FIRST, Gated
from .report import write_text

FORMAT = "bise-export-1"
_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                "num_channels", "num_groups")


class ExportError(RuntimeError):
    """The gated model cannot be exported exactly; the message names the blocking module."""


class ChannelScale(nn.Module):
    """``x * scale`` with a fixed 0/1 per-channel ``scale`` along ``dim`` (a frozen gate)."""

    def __init__(self, scale: Tensor, dim: int = 1):
        super().__init__()
        self.dim = dim
        self.num_channels = int(scale.numel())
        self.register_buffer("scale", scale.detach().float().clone())

    def forward(self, x: Tensor) -> Tensor:
        shape = [1] * x.dim()
        shape[self.dim] = self.num_channels
        return x * self.scale.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, dim={self.dim}, zeros={int((self.scale == 0).sum())}"


class FixedGate(nn.Module):
    """``mask(activation(x))``: an exported gate kept where a channel must stay although the gate
    zeroes it (a residual union, a round_to pad, a channel-mixing norm behind it)."""

    def __init__(self, activation: nn.Module, scale: Tensor, dim: int = 1):
        super().__init__()
        self.activation = activation
        self.mask = ChannelScale(scale, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask(self.activation(x))


class _ChannelScalePruner(tp.pruner.function.BasePruningFunc):
    TARGET_MODULES = (ChannelScale,)

    def prune_out_channels(self, layer: ChannelScale, idxs):
        keep = sorted(set(range(layer.num_channels)) - set(idxs))
        layer.scale = layer.scale[keep].clone()
        layer.num_channels = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: ChannelScale):
        return layer.num_channels

    get_in_channels = get_out_channels


class _GroupNormPruner(tp.pruner.function.GroupNormPruner):
    """Torch-Pruning's GroupNorm pruner keeps num_groups; here a GroupNorm loses whole groups only (see
    _splits_badly), and num_groups follows."""

    def prune_out_channels(self, layer: nn.GroupNorm, idxs):
        per_group = layer.num_channels // layer.num_groups
        super().prune_out_channels(layer, idxs)
        layer.num_groups -= len(idxs) // per_group
        return layer

    prune_in_channels = prune_out_channels


_PRUNER = _ChannelScalePruner()
_CUSTOM_PRUNERS = {ChannelScale: _PRUNER, nn.GroupNorm: _GroupNormPruner()}


def _masks_of(model: nn.Module, gates) -> dict[str, Tensor]:
    """name of each Gated wrapper -> bool keep mask (from ``gates`` if given, else the gates' own)."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, Gated)}
    if not found:
        raise ExportError("the model has no gated module (bise.gates.Gated); "
                          "insert gates with bise.gates.insert_gates first")
    given = dict(gates) if gates is not None else {}
    unknown = sorted(set(given) - set(found))
    if unknown:
        raise ExportError(f"gates names {unknown} are not gated modules of the model; gated: {sorted(found)}")
    masks = {}
    for name, wrapper in found.items():
        g = given.get(name, wrapper.gate)
        mask = g.mask() if isinstance(g, ChannelGate) else torch.as_tensor(g)
        if mask.dtype != torch.bool or mask.shape != (wrapper.gate.num_channels,):
            raise ExportError(f"mask of {name!r} must be bool of shape ({wrapper.gate.num_channels},), "
                              f"got {mask.dtype} {tuple(mask.shape)}")
        masks[name] = mask.detach().cpu()
    return masks


def _keep_fixed_gates(model: nn.Module, placed: list) -> None:
    """The FixedGates ``placed`` ([(name, module)]) run: nn.TransformerEncoderLayer's fused inference path
    runs its activation itself and would skip one (bise_kernels.nn.model.keep_modular_path), as it
    skipped the Gated wrapper before; elsewhere the fused paths come back."""
    restore_fused_path(model)
    keep_modular_path(model, [([name], m) for name, m in placed])


def freeze_gates(model: nn.Module, gates=None) -> nn.Module:
    """Copy of ``model`` (CPU, fp32, eval) with every gated wrapper replaced by a FixedGate of its mask:
    the masked model as plain modules, the reference the export must match."""
    masks = _masks_of(model, gates)
    frozen = copy.deepcopy(model).cpu().float().eval()
    placed = []
    for name, mask in masks.items():
        wrapper = frozen.get_submodule(name)
        placed.append((name, FixedGate(wrapper.activation, mask.float(), wrapper.gate.dim)))
        frozen.set_submodule(name, placed[-1][1])
    _keep_fixed_gates(frozen, placed)
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def _probe_inputs(example_input: Tensor) -> Tensor:
    """The example batch plus random inputs in and beyond its range, so that a channel found constant
    is constant by construction (gated off), not by accident of one batch."""
    x = example_input.detach().cpu().float()[:8]
    gen = torch.Generator().manual_seed(0)
    lo, hi = float(x.min()), float(x.max())
    shape = (8,) + tuple(x.shape[1:])
    uniform = torch.rand(shape, generator=gen) * (hi - lo + 1e-3) + lo
    wide = torch.randn(shape, generator=gen) * 2 * (hi - lo + 1e-3) + x.mean()
    return torch.cat([x, uniform, wide])


def _is_consumer(dg, dep) -> bool:
    m = dep.target.module
    if not dg.is_in_channel_pruning_fn(dep.handler):
        return False
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.modules.conv._ConvNd) and not (m.groups == m.in_channels == m.out_channels)


def _channel_values(x: Tensor, idx: int, linear: bool) -> Tensor:
    return x[..., idx] if linear else x[:, idx]


def _constant(x: Tensor, idx: int, linear: bool) -> Optional[float]:
    v = _channel_values(x, idx, linear)
    first = v.reshape(-1)[0]
    return float(first) if bool((v == first).all()) else None


def _bias_delta(module: nn.Module, xs: list[Tensor], idxs: list[int]) -> Optional[Tensor]:
    """The bias that stands for input channels ``idxs`` of ``module`` in every call (``xs``: the input of
    each call on the probe; a module run twice, e.g. a shared conv, must read the same constants in
    both), else None: see _call_bias_delta."""
    deltas = [_call_bias_delta(module, x, idxs) for x in xs]
    if any(d is None for d in deltas) or not all(torch.allclose(d, deltas[0], atol=1e-6, rtol=1e-5) for d in deltas):
        return None
    return deltas[0]


def _call_bias_delta(module: nn.Module, x: Tensor, idxs: list[int]) -> Optional[Tensor]:
    """What input channels ``idxs`` of ``module`` (about to be removed) add to its outputs, as a bias; None
    where they are not constant on the probe ``x`` or no bias stands for them (a zero-padded conv sees a
    non-zero constant inside and 0 in the pad; a grouped or transposed conv is not mapped): such channels
    stay, zeroed by their fixed gate."""
    linear = isinstance(module, nn.Linear)
    values = [_constant(x, i, linear) for i in idxs]
    if any(v is None for v in values):
        return None
    v = torch.tensor(values, dtype=module.weight.dtype)
    if not bool(v.any()):
        return torch.zeros(module.weight.shape[0], dtype=module.weight.dtype)
    if linear:
        return module.weight[:, idxs] @ v
    if not (isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1):
        return None
    spatial = (1,) * (x.dim() - 2)
    const = v.view(1, -1, *spatial).expand((1, len(idxs)) + tuple(x.shape[2:]))
    mapped = module._conv_forward(const, module.weight[:, idxs], None)[0]  # the module's own padding mode
    delta = mapped.reshape(len(mapped), -1)[:, 0]
    uniform = torch.allclose(mapped, delta.view(-1, *spatial).expand_as(mapped), atol=1e-6, rtol=1e-5)
    return delta if uniform else None


def _fold_constants(module: nn.Module, delta: Tensor) -> None:
    """Add ``delta`` (see _bias_delta) to the bias of ``module``, creating one if needed."""
    if not bool(delta.any()):
        return
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(module.weight.shape[0], dtype=module.weight.dtype),
                                   requires_grad=False)
    with torch.no_grad():
        module.bias += delta


def _splits_badly(m: nn.Module, idxs: list[int]) -> bool:
    """Would losing channels ``idxs`` (of ``m``) change what ``m`` computes for the others, or make it
    invalid? A grouped conv that is not a plain depthwise one (its groups need equal widths; Torch-Pruning
    makes a weight the conv rejects), a LayerNorm, and a GroupNorm that would lose part of a group (a
    removed channel, even a zero one, is part of its group's statistics; whole groups may go). Channels
    coupled to such a layer stay, zeroed by their fixed gate."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.groups > 1 and not (m.groups == m.in_channels == m.out_channels)
    if isinstance(m, nn.GroupNorm):
        return bool(_partial_groups(m, idxs))
    return isinstance(m, nn.LayerNorm)


def _partial_groups(norm: nn.GroupNorm, idxs: list[int]) -> set[int]:
    """The groups of ``norm`` that channels ``idxs`` cover only in part."""
    per_group, lost = norm.num_channels // norm.num_groups, set(idxs)
    return {i // per_group for i in lost
            if not lost.issuperset(range(i // per_group * per_group, (i // per_group + 1) * per_group))}


def _give_back(dg, scale: ChannelScale, removable: list[int], refused) -> list[int]:
    """Give back removable channels of ``scale`` (they stay, zeroed by their fixed gate: exact) until no layer
    of their pruning group refuses its part: ``refused(item)`` is the set of root indices that item's layer
    will not lose (empty: it accepts)."""
    while removable:
        for item in dg.get_pruning_group(scale, _PRUNER.prune_out_channels, idxs=removable):
            back = refused(item)
            if back:
                removable = [i for i in removable if i not in back]
                break
        else:
            return removable
    return removable


def _whole_norm_groups(dg, scale: ChannelScale, removable: list[int]) -> list[int]:
    """Give back the removable channels of every GroupNorm group they would cover only in part (with
    several channels per group, a group goes whole or not at all; with 70% of the units dead, and dying
    independently, about half of a ResNet-GN's 2-channel groups are dead)."""
    def refused(item) -> set:
        norm, plain = item.dep.target.module, _plain(item.idxs)
        if not isinstance(norm, nn.GroupNorm):
            return set()
        per_group, partial = norm.num_channels // norm.num_groups, _partial_groups(norm, plain)
        return {root for i, root in zip(plain, item.root_idxs) if i // per_group in partial}

    return _give_back(dg, scale, removable, refused)


def _plain(idxs) -> list[int]:
    return [int(getattr(i, "idx", i)) for i in idxs]


# Torch-Pruning's nodes of unary elementwise ops (activations, by autograd name): channel c from channel c alone
_UNARY = ("ReluBackward", "HardtanhBackward", "SiluBackward", "GeluBackward", "HardswishBackward",
          "LeakyReluBackward", "EluBackward", "TanhBackward", "SigmoidBackward", "HardsigmoidBackward")


def _per_channel(node) -> bool:
    m = node.module
    if isinstance(m, nn.BatchNorm2d):
        return True
    return (isinstance(m, tp.ops._ElementWiseOp) and len(node.inputs) == 1
            and str(m._grad_fn).startswith(_UNARY))


def _next_scale_through_depthwise(dg, scale: ChannelScale) -> Optional[ChannelScale]:
    """The gate that ``scale``'s output reaches through one depthwise conv, BatchNorms and activations alone,
    each the only reader of the one before (so channel c of ``scale`` reaches channel c of that gate and
    nothing else); None for any other path."""
    node = dg.module2node.get(scale)
    seen_depthwise = False
    while node is not None and len(node.outputs) == 1:
        node = node.outputs[0]
        m = node.module
        if isinstance(m, ChannelScale):
            return m if seen_depthwise and m.num_channels == scale.num_channels and m.dim == scale.dim == 1 else None
        if (isinstance(m, nn.Conv2d) and not seen_depthwise and m.groups == m.in_channels == m.out_channels
                and len(node.inputs) == 1):
            seen_depthwise = True
        elif not _per_channel(node):
            return None
    return None


def _zero_behind_depthwise(dg, scales: Mapping[str, ChannelScale]) -> dict[ChannelScale, ChannelScale]:
    """Zero the channels of a gate whose only reader is a depthwise conv whose channel the next gate zeroes:
    exact (a depthwise conv computes channel c from channel c alone, and that output is zeroed), and lets the
    whole chain's channel go. A channel goes only when every gate coupled to it is off, so MobileNetV2's
    expand channels behind dead depthwise channels stayed (its width-0.5 export, random gates: 388,759
    parameters where 276,968 compute the same function). Returns {next gate: gate} of each such pair: behind
    a zeroed channel of the gate, the next gate passes a constant (see _group_ok)."""
    pairs = {}
    for before in scales.values():
        after = _next_scale_through_depthwise(dg, before)
        if after is not None:
            before.scale[after.scale == 0] = 0
            pairs[after] = before
    return pairs


def _group_ok(dg, scale: ChannelScale, idxs: list[int], inputs: dict,
              fed_by: Mapping[ChannelScale, ChannelScale]) -> bool:
    """May channels ``idxs`` of ``scale`` go? Every fixed gate coupled to them zeroes them, or is fed through a
    depthwise conv by a gate that zeroes them (``fed_by``, from _zero_behind_depthwise: it passes a constant
    there, e.g. MobileNetV2's depthwise gate behind a dead expand channel), and every consumer that reads them
    reads a constant a bias can stand for (so an ungated source, e.g. a ResNet stem, keeps them)."""
    for dep, item_idxs in dg.get_pruning_group(scale, _PRUNER.prune_out_channels, idxs=idxs):
        m, plain = dep.target.module, _plain(item_idxs)
        if _splits_badly(m, plain):
            return False
        if isinstance(m, ChannelScale):
            # an index past the layer: a channel map Torch-Pruning does not follow (torch.chunk; it raised
            # IndexError here): the channels stay (the final check catches a wrong map within range)
            if max(plain, default=-1) >= m.num_channels:
                return False
            off = m.scale[plain] == 0
            if m in fed_by:  # pruned with m in every group (the depthwise conv couples them): same indices
                off |= fed_by[m].scale[plain] == 0
            if not bool(off.all()):
                return False
        elif _is_consumer(dg, dep):
            width = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            xs = inputs.get(id(m))  # absent: the consumer did not run on the probe
            if max(plain, default=-1) >= width or xs is None or _bias_delta(m, xs, plain) is None:
                return False
    return True


def _check_channel_dim(dg, model: nn.Module, name: str, scale: ChannelScale) -> None:
    """A gate on dim 2 of a 3-d output matches Torch-Pruning's channels only where Linear layers (last
    dim) produce and read them; next to a conv or a BatchNorm it gates positions of an (N, C, L) map."""
    if scale.dim == 1:
        return
    for dep, _ in dg.get_pruning_group(scale, _PRUNER.prune_out_channels, idxs=[0]):
        m = dep.target.module
        if isinstance(m, CHANNEL_FIRST):
            where = next(n for n, sub in model.named_modules() if sub is m)
            raise ExportError(f"gate {name!r} scales dim {scale.dim} of its input, but {where!r} ({type(m).__name__}) "
                              "has its channels on dim 1: the gate removes positions, not channels; gate that "
                              "layer with a dim=1 ChannelGate or exclude it")


def _round_up(removable: list[int], n: int, round_to: Optional[int]) -> list[int]:
    """Give back removable channels so that at least one (conv2d needs >= 1 filter) and a multiple of
    ``round_to`` stay; the given-back channels remain zeroed by their fixed gate, so this is exact."""
    kept = n - len(removable)
    target = max(1, kept)
    if round_to and round_to > 1:
        target = max(round_to, -(-kept // round_to) * round_to)
    target = min(n, target)
    return removable[: n - target]


def _round_producers(dg, scale: ChannelScale, removable: list[int], round_to: Optional[int]) -> list[int]:
    """Give back removable channels until every layer that loses output channels keeps at least one and,
    with ``round_to``, a multiple of it (or all it had). Behind a torch.cat one gate covers several
    producers: all of one conv's filters may be among its channels, and rounding the gate's count alone
    left the producers (and the earlier gates on them) off their multiples."""
    step = round_to if round_to and round_to > 1 else 1

    def refused(item) -> set:
        m = item.dep.target.module
        if not (isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and dg.is_out_channel_pruning_fn(item.dep.handler)):
            return set()
        width, kept = m.weight.shape[0], m.weight.shape[0] - len(item.idxs)
        target = min(width, max(step, -(-kept // step) * step))
        return set(item.root_idxs[: target - kept]) if target > kept else set()

    return _give_back(dg, scale, removable, refused)


def _fold_batchnorm(model: nn.Module, dg) -> list[str]:
    """Fold each eval-mode BatchNorm2d whose only input is a Conv2d read by nothing else into that conv
    (one without running statistics normalises with the batch's, even in eval: it stays)."""
    folded = []
    for name, bn in list(model.named_modules()):
        if not isinstance(bn, nn.BatchNorm2d) or bn not in dg.module2node or bn.running_var is None:
            continue
        node = dg.module2node[bn]
        if len(node.inputs) != 1 or not isinstance(node.inputs[0].module, nn.Conv2d):
            continue
        conv_node = node.inputs[0]
        if len(conv_node.outputs) != 1:
            continue
        conv = conv_node.module
        with torch.no_grad():
            std = torch.sqrt(bn.running_var + bn.eps)
            gamma = bn.weight if bn.affine else torch.ones_like(std)
            beta = bn.bias if bn.affine else torch.zeros_like(std)
            scale = gamma / std
            bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(beta + (bias - bn.running_mean) * scale, requires_grad=False)
        model.set_submodule(name, nn.Identity())
        folded.append(name)
    return folded


def _compare(model: nn.Module, probe: Tensor, reference: Tensor, what: str) -> None:
    """ExportError unless ``model`` computes ``reference`` on ``probe``: ``what`` (a gate's removal, run
    after each one so that the error names the gate, or the whole export) broke the function."""
    hint = ("the usual cause is an op that Torch-Pruning does not see coupling the removed channels (a view or "
            "reshape that moves channels, e.g. a channel shuffle); exclude that gate (gate_exclude / exclude=), "
            "or report the model if it has no such op")
    try:
        with torch.no_grad():
            got = model(probe)
    except RuntimeError as exc:
        raise ExportError(f"{what} breaks the forward pass ({str(exc).splitlines()[0]}): {hint}") from exc
    if got.shape != reference.shape:
        raise ExportError(f"{what} changes the output shape {tuple(reference.shape)} -> {tuple(got.shape)}: a "
                          "gated channel reaches the model output")
    diff = float((got - reference).abs().max())
    if diff > 1e-4 * max(1.0, float(reference.abs().max())):
        raise ExportError(f"{what} changes the output by {diff:.3g} on the probe: {hint}")


def max_abs_diff(a: nn.Module, b: nn.Module, inputs, *, batch_size: int = 256) -> float:
    """max |a(x) - b(x)| over ``inputs`` (a tensor, or a data split with ``.inputs()``), both in eval mode
    (their modes are restored afterwards)."""
    x = inputs.inputs() if hasattr(inputs, "inputs") else inputs
    devices = [next(m.parameters(), torch.empty(0)).device for m in (a, b)]
    modes = a.training, b.training
    a.eval(), b.eval()
    worst = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb = x[start:start + batch_size].float()
                ya, yb = (m(xb.to(d)).float().cpu() for m, d in zip((a, b), devices))
                if ya.shape != yb.shape:
                    raise ExportError(f"output shapes differ: {tuple(ya.shape)} vs {tuple(yb.shape)}")
                worst = max(worst, float((ya - yb).abs().max()) if ya.numel() else 0.0)
    finally:
        a.train(modes[0]), b.train(modes[1])
    return worst


def export_subnetwork(model: nn.Module, gates: Optional[Mapping] = None, *, example_input: Tensor,
                      fold_bn: bool = False, round_to: Optional[int] = None, check: bool = True) -> nn.Module:
    """Plain nn.Module (CPU, fp32, eval, every parameter trainable) computing the masked ``model`` with dead
    channels removed.

    ``gates``: name of each gated wrapper -> ChannelGate or bool mask (default: the model's own gates).
    ``example_input``: a batch of real inputs (traced by DependencyGraph and used as the probe).
    ``fold_bn`` folds BatchNorm into the preceding conv; ``round_to`` keeps channel counts at multiples of
    it (extra channels stay zeroed by a fixed scale; a layer narrower than ``round_to`` keeps its full
    width). Raises ExportError naming the module that blocks exact removal, or if the result differs from
    the masked model on the probe (``check``).
    """
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive int or None, got {round_to!r}")
    for name, flag in (("fold_bn", fold_bn), ("check", check)):
        if not isinstance(flag, bool):  # fold_bn="no" folded
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if not isinstance(example_input, Tensor) or example_input.dim() < 2 or len(example_input) == 0:
        raise ValueError(f"example_input must be a non-empty batch tensor, got {type(example_input).__name__}")
    masked = freeze_gates(model, gates)
    out = copy.deepcopy(masked)
    probe = _probe_inputs(example_input)
    with torch.no_grad():
        try:
            reference = masked(probe)
        except RuntimeError as exc:
            raise ValueError(f"the model does not accept example_input of shape {tuple(example_input.shape)}: "
                             f"{str(exc).splitlines()[0]} (pass a batch of inputs shaped like the data's)") from exc
    if not isinstance(reference, Tensor):
        raise ValueError(f"the model must return one tensor (the class logits), got {type(reference).__name__}")
    scales = {n: m.mask for n, m in out.named_modules() if isinstance(m, FixedGate)}
    for p in out.parameters():
        p.requires_grad_(True)  # DependencyGraph traces the autograd graph
    try:
        dg = tp.DependencyGraph().build_dependency(out, example_inputs=probe[:2], verbose=False,
                                                   customized_pruners=_CUSTOM_PRUNERS)
    except Exception as exc:  # torch-pruning raises bare errors on unsupported graphs
        raise ExportError(f"torch-pruning could not trace the model: {type(exc).__name__}: {exc}") from exc
    finally:
        for p in out.parameters():
            p.requires_grad_(False)
    fed_by = _zero_behind_depthwise(dg, scales)
    inputs: dict[int, list[Tensor]] = {}  # every call's input: a module may run more than once
    hooks = [m.register_forward_hook(lambda m, a, o: inputs.setdefault(id(m), []).append(a[0].detach()))
             for m in out.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    ran: set[int] = set()
    hooks += [m.register_forward_hook(lambda m, a, o: ran.add(id(m))) for m in scales.values()]
    with torch.no_grad():
        out(probe)
    for h in hooks:
        h.remove()
    for name, scale in scales.items():
        if scale not in dg.module2node:
            if id(scale) in ran:  # it ran, but autograd (which the trace follows) reaches no weight before it
                raise ExportError(f"gate {name!r} gates channels that no layer with weights makes (the model's "
                                  "input): removing them would change the input the model takes; leave it out "
                                  "(gate_exclude)")
            raise ExportError(f"gate {name!r} did not run in the traced forward pass")
        candidates = [i for i in range(scale.num_channels) if scale.scale[i] == 0]
        if not candidates:
            continue
        _check_channel_dim(dg, out, name, scale)
        # all of them; else those of whole GroupNorm groups; else one by one (a GroupNorm's then stay)
        if _group_ok(dg, scale, candidates, inputs, fed_by):
            removable = candidates
        else:
            whole = _whole_norm_groups(dg, scale, candidates)
            removable = whole if whole != candidates and whole and _group_ok(dg, scale, whole, inputs, fed_by) else [
                c for c in candidates if _group_ok(dg, scale, [c], inputs, fed_by)]
        while True:  # round (each step gives channels back, so this ends)
            rounded = _whole_norm_groups(dg, scale, _round_producers(
                dg, scale, _round_up(removable, scale.num_channels, round_to), round_to))
            if rounded == removable:
                break
            removable = rounded
        if not removable:
            continue
        group = dg.get_pruning_group(scale, _PRUNER.prune_out_channels, idxs=removable)
        for dep, item_idxs in group:
            m = dep.target.module
            if _is_consumer(dg, dep):
                plain = _plain(item_idxs)
                linear = isinstance(m, nn.Linear)
                xs, dim = inputs[id(m)], -1 if linear else 1
                _fold_constants(m, _bias_delta(m, xs, plain))
                keep = torch.tensor(sorted(set(range(xs[0].shape[dim])) - set(plain)), dtype=torch.long)
                inputs[id(m)] = [x.index_select(dim, keep) for x in xs]  # a later group indexes the pruned layer
        group.prune()
        if check:
            _compare(out, probe, reference, f"removing the dead channels of gate {name!r}")
    for name, scale in scales.items():
        if bool((scale.scale == 1).all()):
            out.set_submodule(name, out.get_submodule(name).activation)
    restore_fused_path(out)  # the FixedGates left keep their hook (copied with them)
    if fold_bn:
        _fold_batchnorm(out, dg)
    out.eval().requires_grad_(True)  # like a built module (and load_exported's): pruned ones were new Parameters
    if check:
        _compare(out, probe, reference, "the exported model")
    return out


def describe(module: nn.Module, spec: Optional[dict] = None) -> dict:
    """JSON-able architecture description of an exported module: per-module type and channel counts."""
    modules = {}
    for name, m in module.named_modules():
        if not name:
            continue
        entry = {"type": type(m).__name__}
        entry.update({a: int(getattr(m, a)) for a in _SHAPE_ATTRS if isinstance(getattr(m, a, None), int)})
        if isinstance(m, FixedGate):
            entry.update(num_channels=m.mask.num_channels, dim=m.mask.dim)
        if hasattr(m, "bias") and isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            entry["bias"] = m.bias is not None
        modules[name] = entry
    return {"format": FORMAT, "spec": spec, "modules": modules}


def arch_path(path: str) -> str:
    """The architecture description that sits beside an exported state_dict: ``X.pt`` -> ``X.json``."""
    root, _ = os.path.splitext(path)
    return root + ".json"


def save_exported(module: nn.Module, path: str, spec: Optional[dict] = None) -> dict:
    """Write ``module``'s state_dict to ``path`` and its description to ``arch_path(path)`` (atomic; under
    torchrun a collective: every rank calls it with the same path, rank 0 writes)."""
    if os.path.abspath(arch_path(path)) == os.path.abspath(path):  # "m.json": the weights would overwrite it
        raise ValueError(f"path {path!r} ends in .json, where its description goes (arch_path); give the weights "
                         "another name, e.g. 'subnetwork.pt'")
    desc = describe(module, spec)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    write_text(arch_path(path), json.dumps(desc, indent=1))
    save_atomic(state, path)
    return desc


def _resize(module: nn.Module, prefix: str, state: dict, entry: dict) -> None:
    for attr in _SHAPE_ATTRS:
        if attr in entry and hasattr(module, attr):
            setattr(module, attr, entry[attr])
    if entry.get("bias") is False and getattr(module, "bias", None) is not None:
        module.bias = None
    for pname in list(module._parameters):
        key = prefix + pname
        if key in state:
            module._parameters[pname] = nn.Parameter(torch.empty_like(state[key]))
    if entry.get("bias") and module._parameters.get("bias") is None and prefix + "bias" in state:
        module.bias = nn.Parameter(torch.empty_like(state[prefix + "bias"]))
    for bname in list(module._buffers):
        key = prefix + bname
        if key in state and module._buffers[bname] is not None:
            module._buffers[bname] = torch.empty_like(state[key])


def load_exported(path: str, model: Optional[nn.Module] = None) -> nn.Module:
    """Rebuild an exported module from ``path`` (weights_only torch.load) and the JSON beside it.

    The unpruned architecture comes from the description's built-in spec (bise.models.rebuild), or
    from ``model`` (an instance of the user's own architecture, gated or not) for custom models."""
    for p in (path, arch_path(path)):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"exported model file {p!r} does not exist")
    try:
        desc = json.load(open(arch_path(path)))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"cannot read exported model {path!r}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(desc, dict) or desc.get("format") != FORMAT or not isinstance(state, dict):
        raise ExportError(f"{arch_path(path)!r} is not a {FORMAT} description")
    if model is None:
        if not desc.get("spec"):
            raise ExportError(f"{path!r} holds a custom architecture: pass model= (an instance of it)")
        from bise.models import rebuild
        model = rebuild(desc["spec"])
    base = copy.deepcopy(model).cpu().float()
    placed = []
    for name, m in list(base.named_modules()):
        if name and isinstance(m, Gated):
            base.set_submodule(name, m.activation)
    for name, entry in desc["modules"].items():
        try:
            current = base.get_submodule(name)
        except AttributeError:
            raise ExportError(f"{path!r}: module {name!r} not found in the rebuilt architecture") from None
        if entry["type"] == "FixedGate" and not isinstance(current, FixedGate):
            placed.append((name, FixedGate(current, torch.ones(entry["num_channels"]), entry["dim"])))
            base.set_submodule(name, placed[-1][1])
        elif entry["type"] == "Identity" and not isinstance(current, nn.Identity):
            base.set_submodule(name, nn.Identity())
    _keep_fixed_gates(base, placed)
    for name, entry in desc["modules"].items():
        _resize(base.get_submodule(name), name + ".", state, entry)
    _resize(base, "", state, {})  # the root's own parameters (a channel scale on the model) shrink too
    try:
        base.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{path!r} does not match its architecture description: {exc}") from exc
    return base.eval()
