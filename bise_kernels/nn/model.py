"""mask_model: swap a model's Linear / Conv2d layers for masked ones, layerwise or with one global top-k."""

from __future__ import annotations

import fnmatch
import weakref
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import _checks, _ops
from ._scored import outside_inference_mode
from .masked import MaskedConv2d, MaskedLinear


class GlobalSelection:
    """One exact top-k over the scores of several layers, recomputed only when a score changes.

    Layers keep their own score tensors (no concatenation); layer i receives the shared
    threshold and the tie cut shifted by its offset in the virtual concatenation.
    """

    def __init__(self, layers: Sequence[nn.Module], density: float):
        self.layers = list(layers)
        self.density = _checks.check_density(density)
        self._key = None
        self._refs: list[weakref.ref] = []
        self._result: dict[int, tuple[Tensor, Tensor]] = {}

    def __getstate__(self) -> dict:
        """Pickled and deep-copied without the cached result (weak references; selected again)."""
        return {**self.__dict__, "_key": None, "_refs": [], "_result": {}}

    def selection_for(self, layer: nn.Module) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s ``(thr, cut)``, cached as a layer's own selection (ScoredModule._selection:
        the scores' versions, data pointers and the tensors themselves, by weak reference)."""
        scores = [m.scores for m in self.layers]
        if _ops._uncached():
            return self._select(scores)[id(layer)]
        key = tuple((s._version, s.data_ptr()) for s in scores)
        if key != self._key or any(r() is not s for r, s in zip(self._refs, scores)):
            result = outside_inference_mode(lambda: self._select(scores))
            self._key, self._refs, self._result = key, [weakref.ref(s) for s in scores], result
        return self._result[id(layer)]

    def _select(self, scores: list[Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
        """``(thr, cut)`` per layer (keyed by id), the cut shifted by the layer's offset."""
        for i, s in enumerate(scores):
            _checks.check_scores(s, f"scores of layer {i}", finite=False)
            # one select over all: one dtype (a layer moved alone by .half() fails in the kernels) and device
            _checks.check_like(s, scores[0], f"scores of layer {i}", "scores of layer 0",
                               why="; scope='global' selects every layer's scores together")
        _checks.check_select_finite(scores, [f"scores of layer {i}" for i in range(len(scores))], "topk_select")
        k = _checks.k_from_density(self.density, sum(s.numel() for s in scores))
        thr, cut = _ops.topk_select([s.detach() for s in scores], k, None)
        result, offset = {}, 0
        for m, s in zip(self.layers, scores):
            result[id(m)] = (thr, cut - offset)
            offset += s.numel()
        return result


def matches(name: str, patterns: Optional[Iterable[str]]) -> bool:
    """Whether a qualified module name matches any fnmatch pattern ("layer1.*"); None matches nothing."""
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def mask_model(model: nn.Module, granularity: str = "weight", *, density: Optional[float] = None,
               threshold: Optional[float] = None, scope: str = "layerwise",
               include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None,
               estimator: str = "ste", temperature: float = 1.0, score_init: Union[str, float, None] = None,
               freeze_weights: bool = True) -> list[nn.Parameter]:
    """Replace nn.Linear / nn.Conv2d modules in place by masked ones; return their score parameters.

    ``include`` / ``exclude`` are fnmatch patterns over qualified module names ("layer1.*"). A module
    shared by several parents becomes one masked layer under all its names, unless any name is excluded.
    ``scope="global"`` selects one top-k over all masked layers together (needs ``density``).
    """
    if scope not in ("layerwise", "global"):
        raise ValueError(f"scope must be 'layerwise' or 'global', got {scope!r}")
    if scope == "global" and density is None:
        raise ValueError("scope='global' needs density (one top-k over all layers); got density=None")
    _checks.check_mask_spec(density, threshold)
    targets = []
    for names, module in _by_module(model, (nn.Linear, nn.Conv2d), exact=True):
        if include is not None and not any(matches(name, include) for name in names):
            continue
        if any(matches(name, exclude) for name in names):
            continue
        targets.append((names, module))
    if not targets:
        masked = len(_by_module(model, (MaskedLinear, MaskedConv2d), exact=False))
        why = f" (its {masked} masked layers are masked already: unmask_model first)" if masked else ""
        raise ValueError(f"no nn.Linear or nn.Conv2d module matches include={include!r}, exclude={exclude!r}{why}")
    if targets[0][0][0] == "":
        raise ValueError("mask_model replaces submodules; pass a model containing the layer, not the layer itself")
    layers = []
    for names, module in targets:
        cls = MaskedLinear if isinstance(module, nn.Linear) else MaskedConv2d
        layer = cls.from_dense(module, granularity, density=density if scope == "layerwise" else 1.0,
                               threshold=threshold, estimator=estimator, temperature=temperature,
                               score_init=score_init, freeze_weights=freeze_weights)
        if scope == "global":
            layer.density = density
        for name in names:
            model.set_submodule(name, layer)
        layers.append(layer)
    if scope == "global":
        selector = GlobalSelection(layers, density)
        for layer in layers:
            layer.global_selector = selector
    return [layer.scores for layer in layers]


def unmask_model(model: nn.Module) -> nn.Module:
    """The inverse of :func:`mask_model`: replace every MaskedLinear / MaskedConv2d in place by the plain
    layer with its current mask baked into the weight (:meth:`to_dense`); return ``model``. The masked
    layers' original weights are left as they were (baked copies replace them)."""
    masked = _by_module(model, (MaskedLinear, MaskedConv2d), exact=False)
    if masked and masked[0][0][0] == "":
        raise ValueError("unmask_model replaces submodules; call to_dense() on a single masked layer")
    for names, module in masked:
        dense = module.to_dense()
        for name in names:
            model.set_submodule(name, dense)
    return model


def _by_module(model: nn.Module, types: tuple, exact: bool) -> list[tuple[list[str], nn.Module]]:
    """The submodules of ``types`` (the type itself if ``exact``, else an instance), each once with
    every qualified name it has: a module shared by two parents is one layer, replaced under both
    names (``named_modules`` gives it under its first name only)."""
    found: dict[int, tuple[list[str], nn.Module]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) in types if exact else isinstance(module, types):
            found.setdefault(id(module), ([], module))[0].append(name)
    return list(found.values())
