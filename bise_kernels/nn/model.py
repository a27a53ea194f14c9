"""mask_model: swap a model's Linear / Conv2d layers for masked ones, layerwise or with one global top-k."""

from __future__ import annotations

import fnmatch
import logging
from typing import Iterable, Optional, Sequence, Union

from torch import Tensor, nn

from .. import _checks, _ops
from ._scored import CacheEntry, outside_inference_mode
from .masked import MaskedConv2d, MaskedLinear, check_dense

_log = logging.getLogger(__name__)


class GlobalSelection:
    """One exact top-k over the scores of several layers, recomputed only when a score changes.

    Layers keep their own score tensors (no concatenation); layer i receives the shared
    threshold and the tie cut shifted by its offset in the virtual concatenation.
    """

    def __init__(self, layers: Sequence[nn.Module], density: float):
        self.layers = list(layers)
        self.density = density
        self._cache: Optional[CacheEntry] = None

    @property
    def density(self) -> float:
        return self._density

    @density.setter
    def density(self, value: float) -> None:
        """The density of the one top-k, written to every layer too (a layer's own ``density`` is refused
        when it differs: :meth:`selection_for`)."""
        self._density = _checks.check_density(value)
        for layer in self.layers:
            layer.density = self._density

    def __getstate__(self) -> dict:
        """Pickled and deep-copied without the cached result (weak references; selected again)."""
        return {**self.__dict__, "_cache": None}

    def selection_for(self, layer: nn.Module) -> tuple[Tensor, Tensor]:
        """Layer ``layer``'s ``(thr, cut)``, cached as a layer's own selection (a CacheEntry of every
        layer's scores and the density: a new ``density`` was not seen until a score changed)."""
        if layer.threshold is not None:  # set on the layer alone: the forward ignored it, mask() failed
            raise ValueError(f"this layer has threshold={layer.threshold!r}, but with scope='global' one top-k "
                             f"over all layers decides (density {self._density!r}); set layer.threshold = None, "
                             f"or mask with scope='layerwise'")
        if layer.density != self._density:  # set on the layer alone: it was ignored without a word
            raise ValueError(f"this layer's density {layer.density!r} differs from its global selection's "
                             f"{self._density!r}: with scope='global' one top-k over all layers decides; set "
                             f"layer.global_selector.density (every layer), or mask with scope='layerwise'")
        scores = [m.scores for m in self.layers]
        if _ops._uncached():
            return self._select(scores)[id(layer)]
        rest = (self._density,)
        if self._cache is None or not self._cache.serves(scores, rest):
            self._cache = CacheEntry(scores, rest, outside_inference_mode(lambda: self._select(scores)))
        return self._cache.value[id(layer)]

    def _select(self, scores: list[Tensor]) -> dict[int, tuple[Tensor, Tensor]]:
        """``(thr, cut)`` per layer (keyed by id), the cut shifted by the layer's offset."""
        for i, s in enumerate(scores):
            _checks.check_scores(s, f"scores of layer {i}", finite=False)
            # one select over all: one dtype (a layer moved alone by .half() fails in the kernels) and device
            _checks.check_like(s, scores[0], f"scores of layer {i}", "scores of layer 0",
                               why="; scope='global' selects every layer's scores together")
        _checks.check_select_finite(scores, [f"scores of layer {i}" for i in range(len(scores))], "topk_select")
        k = _checks.k_from_density(self._density, sum(s.numel() for s in scores))
        thr, cut = _ops.topk_select([s.detach() for s in scores], k, None)
        result, offset = {}, 0
        for m, s in zip(self.layers, scores):
            result[id(m)] = (thr, cut - offset)
            offset += s.numel()
        return result


def matches(name: str, patterns: Optional[Iterable[str]]) -> bool:
    """Whether a qualified module name matches any fnmatch pattern ("layer1.*"); None matches nothing."""
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_patterns(patterns: object, name: str) -> None:
    """``patterns`` (``name``: include / exclude) a list, tuple or set of fnmatch patterns, or None. A str
    was taken as patterns of one character each: exclude="2.0" excluded module "0" and kept "2.0"."""
    if patterns is not None and (not isinstance(patterns, (list, tuple, set, frozenset)) or
                                 not all(isinstance(p, str) for p in patterns)):
        raise TypeError(f"{name} must be a list of module-name patterns (fnmatch) or None, got {patterns!r}")


def refuse_unmatched(arg: str, patterns: Sequence[str], names: list[str], what: str, shown: int = 8) -> None:
    """ValueError naming the patterns that match none of ``names``, and listing some of ``names``."""
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        listed = ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")
        raise ValueError(f"{arg} pattern(s) {unmatched} match no {what} (fnmatch over qualified names); "
                         f"those are: {listed or 'none'}")


def mask_model(model: nn.Module, granularity: str = "weight", *, density: Optional[float] = None,
               threshold: Optional[float] = None, scope: str = "layerwise",
               include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None,
               estimator: str = "ste", temperature: float = 1.0, score_init: Union[str, float, None] = None,
               freeze_weights: bool = True) -> list[nn.Parameter]:
    """Replace nn.Linear / nn.Conv2d modules in place by masked ones; return their score parameters.

    ``include`` / ``exclude`` are fnmatch patterns over qualified module names ("layer1.*"); an
    ``exclude`` pattern that matches no nn.Linear / nn.Conv2d is a ValueError naming it (a typo would
    leave the layer masked), as bise's ``gate_exclude``. A module
    shared by several parents becomes one masked layer under all its names, unless any name is excluded.
    ``scope="global"`` selects one top-k over all masked layers together (needs ``density``).

    Only what a masked layer computes for real is replaced (:func:`_why_left_dense`): a subclass
    (nn.MultiheadAttention's out_proj, a QAT or parametrized layer, a LazyLinear not yet run), a layer
    with hooks, a child of nn.MultiheadAttention (which reads its weights itself) or a padding
    MaskedConv2d does not take is left dense with one logged warning naming it, or, if an ``include``
    pattern is its exact name, a ValueError. Nothing is changed when an error is raised. A
    TransformerEncoderLayer's fused inference path (which reads linear1 / linear2's weights itself)
    is turned off for its masked layers (see :func:`keep_modular_path`).
    """
    if scope not in ("layerwise", "global"):
        raise ValueError(f"scope must be 'layerwise' or 'global', got {scope!r}")
    if scope == "global" and density is None:
        raise ValueError("scope='global' needs density (one top-k over all layers); got density=None")
    _checks.check_mask_spec(density, threshold)
    check_patterns(include, "include")
    check_patterns(exclude, "exclude")
    candidates = _by_module(model, (nn.Linear, nn.Conv2d))
    if exclude:  # a typo kept a layer masked (an unnamed Sequential's classifier is "8", not "fc")
        refuse_unmatched("exclude", exclude, [n for names, _ in candidates for n in names],
                         "nn.Linear or nn.Conv2d module")
    targets, left = [], []
    for names, module in candidates:
        if isinstance(module, (MaskedLinear, MaskedConv2d)):
            continue
        if include is not None and not any(matches(name, include) for name in names):
            continue
        if any(matches(name, exclude) for name in names):
            continue
        why = _why_left_dense(model, names, module)
        if why is None:
            targets.append((names, module))
        elif include is not None and any(name in include for name in names):
            raise ValueError(f"cannot mask {names[0]!r} (named by include): {why}")
        else:
            left.append((names, why))
    if not targets:
        masked = sum(isinstance(module, (MaskedLinear, MaskedConv2d)) for _, module in candidates)
        why = f" (its {masked} masked layers are masked already: unmask_model first)" if masked else ""
        why += "".join(f"; {', '.join(names)!s} left dense: {reason}" for names, reason in left)
        raise ValueError(f"no nn.Linear or nn.Conv2d module to mask matches include={include!r}, exclude={exclude!r}"
                         f"{why}")
    if targets[0][0][0] == "":
        raise ValueError("mask_model replaces submodules; pass a model containing the layer, not the layer itself")
    layers = []
    for names, module in targets:  # every layer built before the model is changed: an error changes nothing
        cls = MaskedLinear if isinstance(module, nn.Linear) else MaskedConv2d
        layer = cls.from_dense(module, granularity, density=density if scope == "layerwise" else 1.0,
                               threshold=threshold, estimator=estimator, temperature=temperature,
                               score_init=score_init, freeze_weights=freeze_weights)
        layers.append(layer)  # scope="global": GlobalSelection gives each layer its density
    for names, why in left:
        _log.warning("mask_model left %s dense: %s", ", ".join(names), why)
    for (names, _), layer in zip(targets, layers):
        for name in names:
            model.set_submodule(name, layer)
    keep_modular_path(model, [(names, layer) for (names, _), layer in zip(targets, layers)])
    if scope == "global":
        selector = GlobalSelection(layers, density)
        for layer in layers:
            layer.global_selector = selector
    return [layer.scores for layer in layers]


def _parents(model: nn.Module, names: list[str]) -> list[nn.Module]:
    return [model.get_submodule(name.rpartition(".")[0]) for name in names if name]


def _why_left_dense(model: nn.Module, names: list[str], module: nn.Module) -> Optional[str]:
    """Why mask_model leaves ``module`` (an nn.Linear or nn.Conv2d instance reached by ``names``) dense,
    or None: a masked layer in its place would not be masked for real, or would compute another thing.

    nn.MultiheadAttention passes out_proj.weight (and its bare in_proj_weight) to
    F.multi_head_attention_forward and never calls out_proj: a masked out_proj would mask nothing
    (torchao's quantize_ skips it too: its default filter excludes NonDynamicallyQuantizableLinear;
    Torch-Pruning prunes nn.MultiheadAttention as one unit, with its own pruner). Hooks would not
    follow the module to its replacement (nor would old-style weight_norm / spectral_norm, which are
    hooks)."""
    if any(isinstance(parent, nn.MultiheadAttention) for parent in _parents(model, names)):
        return ("nn.MultiheadAttention reads its weight itself (F.multi_head_attention_forward) and never "
                "calls the module: a masked layer there would mask nothing")
    try:
        check_dense(module, nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d)
    except (TypeError, ValueError) as error:
        return str(error)
    hooks = [kind for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
             if getattr(module, kind)]
    if hooks:
        return (f"it has hooks ({', '.join(h[1:] for h in hooks)}) that a masked layer in its place would not run "
                f"(register them after mask_model)")
    return None


def _modular_path_only(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: its presence turns off nn.TransformerEncoderLayer's fused
    path (torch._transformer_encoder_layer_fwd), which the layer takes in eval mode without autograd
    (no_grad, or frozen weights and input) and which reads linear1.weight / linear2.weight and runs its
    activation itself: a masked linear1 / linear2, or a gated activation module, did not run (torch
    2.13: "forward pre-/hooks are attached to the module" is one of the fast path's exclusions)."""
    return None


def keep_modular_path(model: nn.Module, modules: list[tuple[list[str], nn.Module]]) -> None:
    """Turn off the fused inference paths that would bypass ``modules`` ((qualified names, module) put in
    ``model``: masked layers, bise's gated activations): the pre-hook above on those under an
    nn.TransformerEncoderLayer, and the nested-tensor path of an nn.TransformerEncoder holding any
    (``use_nested_tensor = False``, as torch sets when its layer cannot take the path: only the padded
    tensors' path is left, the same numbers)."""
    for names, module in modules:
        if any(isinstance(parent, nn.TransformerEncoderLayer) for parent in _parents(model, names)):
            module.register_forward_pre_hook(_modular_path_only)
    put = {id(module) for _, module in modules}
    for encoder in model.modules():
        if isinstance(encoder, nn.TransformerEncoder) and any(id(m) in put for m in encoder.modules()):
            encoder.__dict__.setdefault(_NESTED_BEFORE, encoder.use_nested_tensor)
            encoder.use_nested_tensor = False


_NESTED_BEFORE = "_bise_kernels_use_nested_tensor"  # an encoder's use_nested_tensor before keep_modular_path


def restore_fused_path(model: nn.Module) -> None:
    """Undo :func:`keep_modular_path` where nothing needs it any more (after unmask_model, bise's
    remove_gates): an nn.TransformerEncoder none of whose modules carries the pre-hook gets its
    use_nested_tensor back (a plain model's inference path, only a speed matter)."""
    for encoder in model.modules():
        if isinstance(encoder, nn.TransformerEncoder) and _NESTED_BEFORE in encoder.__dict__ and not any(
                _modular_path_only in m._forward_pre_hooks.values() for m in encoder.modules()):
            encoder.use_nested_tensor = encoder.__dict__.pop(_NESTED_BEFORE)


def unmask_model(model: nn.Module) -> nn.Module:
    """The inverse of :func:`mask_model`: replace every MaskedLinear / MaskedConv2d in place by the plain
    layer with its current mask baked into the weight (:meth:`to_dense`); return ``model``. The masked
    layers' original weights are left as they were (baked copies replace them)."""
    masked = _by_module(model, (MaskedLinear, MaskedConv2d))
    if masked and masked[0][0][0] == "":
        raise ValueError("unmask_model replaces submodules; call to_dense() on a single masked layer")
    for names, module in masked:
        dense = module.to_dense()
        for name in names:
            model.set_submodule(name, dense)
    restore_fused_path(model)
    return model


def _by_module(model: nn.Module, types: tuple) -> list[tuple[list[str], nn.Module]]:
    """The submodules that are instances of ``types``, each once with every qualified name it has: a
    module shared by two parents is one layer, replaced under both names (``named_modules`` gives it
    under its first name only)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found: dict[int, tuple[list[str], nn.Module]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, types):
            found.setdefault(id(module), ([], module))[0].append(name)
    return list(found.values())
