"""What every masked module shares: learnable scores, the keep rule (density or threshold), the
gradient estimator, and the selection ``(thr, cut)`` (and, on demand, its packed keep mask) cached
until the scores change."""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
from torch import Tensor, fx, nn
from torch.autograd.graph import increment_version
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import _checks, _ops, backends, functional
from ..functional import selection


def _fused_step_bumps_versions(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After a fused optimizer step (``fused=True``: SGD, Adam, AdamW, Adagrad), bump the version counters of
    the parameters it updated: its kernels write them without (torch 2.13: ``_fused_sgd_`` leaves ``_version``
    as it was, ``_foreach_add_`` bumps it), and the cached selections key on that counter, so a fused step
    left every layer's mask as before the step. Registered for every optimizer when bise_kernels is imported;
    a step that is not fused costs one look at its groups."""
    for group in optimizer.param_groups:
        if group.get("fused"):
            for p in group["params"]:
                if p.grad is not None:  # the parameters a fused step skips keep their values
                    increment_version(p)


register_optimizer_step_post_hook(_fused_step_bumps_versions)


def outside_inference_mode(make):
    """``make()``, run outside torch.inference_mode when inside it: a cached selection or keep mask
    made there would be inference tensors, which the next training forward cannot save for backward
    (evaluating between steps, with the scores unchanged, then made training raise)."""
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return make()
    return make()


class CacheEntry:
    """A value cached for some tensors (scores) and the rest of a key: it serves while each tensor is
    the same object, at the same version counter and data pointer, and the rest of the key is equal.

    Version and data pointer see an optimizer step, an in-place op under torch.no_grad and
    load_state_dict; the tensor itself, held by weak reference, sees a new tensor made where a freed
    one was, with the same version (torch.func.functional_call, a parametrization): the stale value
    was served before. Pickle refuses weak references: owners drop their entries in __getstate__.
    Used by ScoredModule (one tensor) and GlobalSelection (one per layer).
    """

    __slots__ = ("key", "refs", "value")

    def __init__(self, tensors: Sequence[Tensor], rest: tuple, value):
        self.key = _key(tensors, rest)
        self.refs = [weakref.ref(t) for t in tensors]
        self.value = value

    def serves(self, tensors: Sequence[Tensor], rest: tuple) -> bool:
        if len(tensors) == 1:  # a layer's scores: _key written out, no loop (0.12 us less a hit, timeit)
            t = tensors[0]
            return self.key == (t._version, t.data_ptr(), rest) and self.refs[0]() is t
        return self.key == _key(tensors, rest) and all(r() is t for r, t in zip(self.refs, tensors))


def _key(tensors: Sequence[Tensor], rest: tuple) -> tuple:
    """Each tensor's version and data pointer (flat for one tensor), then ``rest``."""
    if len(tensors) == 1:
        return tensors[0]._version, tensors[0].data_ptr(), rest
    return [(t._version, t.data_ptr()) for t in tensors], rest


class _Selected(CacheEntry):
    """A cached ``(thr, cut)``; ``checked``: whether the scores' finiteness was checked (see selection)."""

    __slots__ = ("checked",)


class ScoredModule(nn.Module):
    """Base of the masked layers and the channel gate (set up by :meth:`_init_rule`).

    The selection is cached until the scores change as autograd sees it (their version counter or
    storage: an optimizer step, an in-place op under torch.no_grad, load_state_dict) or are another
    tensor (torch.func.functional_call, a parametrization: a new tensor may sit where a freed one
    was, with the same version), and dropped by the module's conversions (.half(), .to(): :meth:`_apply`).
    A write through ``scores.data`` bypasses the version counter and is not seen (the old threshold,
    or keep mask, would be applied to the new scores): write under torch.no_grad() instead. So does a
    torch.distributed collective into the scores (``dist.broadcast(layer.scores, 0)``): call
    ``torch.autograd.graph.increment_version(layer.scores)`` after it. Fused optimizer steps, which
    write without bumping the counter too, are handled (:func:`_fused_step_bumps_versions`). A tensor
    threshold is keyed by its version as well (changed in place, it is seen).
    """

    scores: nn.Parameter

    def _init_rule(self, scores: Tensor, density: Optional[float], threshold: Optional[float], estimator: str,
                   temperature: float) -> None:
        _checks.check_mask_spec(density, threshold)
        _checks.check_estimator(estimator, temperature)
        self.density = density
        self.threshold = threshold
        self.estimator = estimator
        self.temperature = float(temperature)
        self.scores = nn.Parameter(scores)
        self._cache: Optional[_Selected] = None
        self._keep_cache: Optional[tuple] = None

    def __getstate__(self) -> dict:
        """Pickled and deep-copied without the caches: they hold weak references (which pickle
        refuses) and a copy selects again at its first call."""
        state = super().__getstate__()  # nn.Module's: a copy of __dict__ less what module.compile() set
        state["_cache"] = state["_keep_cache"] = None
        return state

    def _apply(self, fn, recurse=True):
        """nn.Module's conversions (.half(), .float(), .to(), .cuda(), .cpu(), to_empty, share_memory)
        set the scores' data in place (``param.data = fn(param)``): same tensor, same version, and a
        freed block may come back at the same address. ``.half().float()`` then served the selection
        of the values before the fp16 rounding (1 round trip in 17 on the CPU; a caching CUDA
        allocator hands the same block back by design). The caches are dropped."""
        module = super()._apply(fn, recurse)
        self._drop_caches()
        return module

    def _drop_caches(self) -> None:
        self.__dict__["_cache"] = self.__dict__["_keep_cache"] = None

    def __prepare_scriptable__(self):
        """torch.jit.script asks every module this first: a masked module cannot be scripted (its
        forward reads Python state: caches, the registry); it failed inside TorchScript's compiler
        ("Module 'MaskedLinear' has no attribute '__dict__'", "Unknown type annotation: 'nn.Parameter'")."""
        raise TypeError(f"torch.jit.script cannot compile {type(self).__name__}: trace it (torch.jit.trace), "
                        f"compile or export it (torch.compile, torch.export), or script the plain model that "
                        f"unmask_model gives")

    def _fx_node(self, input: fx.Proxy) -> fx.Proxy:
        """This module as one call_module node of a torch.fx.symbolic_trace (an fx.Proxy input), as
        nn.Linear is (a leaf of the default tracer): the forward checks its input in Python control
        flow, which a symbolic input refuses (TraceError)."""
        tracer = input.tracer
        return tracer.create_proxy("call_module", tracer.path_of_module(self), (input,), {})

    def selection(self, fused_check: bool = False) -> tuple[Tensor, Tensor]:
        """``(thr, cut)`` of the current scores; recomputed only when the scores change.

        The previous top-k threshold is passed on as the selection's hint. ``fused_check``: the op
        that consumes it checks a threshold's scores and thr finite in its own pass
        (:func:`..functional._fused_check`; :meth:`_keep_selection`), so none is made here; the
        entry is then marked unchecked, and a later call without ``fused_check`` makes the check
        before it returns it. The pair returned is a copy: the cached one may be shared (a
        threshold's pair serves every layer with that threshold), so writing it in place must not
        change other layers.
        """
        thr, cut = self._selection(self.scores, fused_check)
        return thr.clone(), cut.clone()

    def _selection(self, scores: Tensor, fused_check: bool) -> tuple[Tensor, Tensor]:
        """:meth:`selection` of ``scores``, which the caller read once (~0.5 us an nn.Module attribute).

        The caches are set through ``__dict__``: ``nn.Module.__setattr__`` looks for parameters,
        modules and buffers first (~1.2 us a set, once per scores update). An entry is for the scores
        tensor it holds (:class:`CacheEntry`).
        """
        if _ops._uncached():
            return selection(scores, self.density, self.threshold, fused_check=fused_check)
        # An entry made in a CUDA-graph capture holds what only a replay fills: it serves that capture
        # only, and a capture never takes an eager entry (its replays must select the scores of then).
        capturing = functional._capturing(scores.is_cuda)
        threshold = self.threshold
        if isinstance(threshold, Tensor):  # changed in place: a new version (the tensor alone is its identity)
            threshold = (threshold, threshold._version)
        tensors, rest = (scores,), (self.density, threshold, capturing)
        cache = self._cache
        if cache is None or not cache.serves(tensors, rest) or not (cache.checked or fused_check):
            same_mode = cache is not None and cache.key[-1][-1] == capturing  # the rest's last item
            hint = cache.value[0] if same_mode and self.density is not None else None
            checked = self.density is not None or not fused_check  # a top-k's select always checks
            made = outside_inference_mode(lambda: selection(scores, self.density, self.threshold, hint=hint,
                                                            fused_check=fused_check))
            cache = self.__dict__["_cache"] = _Selected(tensors, rest, made)
            cache.checked = checked
        return cache.value

    def keep(self) -> Tensor:
        """The selection packed into a bool keep mask (the scores' shape, 1 byte per score), computed
        once per selection and reused until the scores change (not part of the state dict)."""
        return self._keep(self.scores)

    def _keep(self, scores: Tensor) -> Tensor:
        """:meth:`keep` of ``scores`` (as :meth:`_selection`)."""
        uncached = _ops._uncached()
        if not uncached:
            # Keyed on the selection's cache entry too: a threshold's (thr, cut) is one pair shared
            # by every version of the scores (functional._device_scalar). A cached mask was made
            # from a checked selection, or checked by keep_mask: an unchecked entry may be taken.
            thr, cut = self._selection(scores, True)
            cached = self._keep_cache
            if cached is not None and cached[0] is thr and cached[1] is cut and cached[2] is self._cache:
                return cached[3]
        thr, cut, check = self._keep_selection(scores)
        if uncached:
            return _ops.keep_mask(scores.detach(), thr, cut, 0, check)
        keep = outside_inference_mode(lambda: _ops.keep_mask(scores.detach(), thr, cut, 0, check))
        self.__dict__["_keep_cache"] = (thr, cut, self._cache, keep)
        return keep

    def _keep_selection(self, scores: Tensor) -> tuple[Tensor, Tensor, bool]:
        """``(thr, cut, check)`` for a new keep mask of ``scores``: ``check`` (keep_mask's
        ``check_finite``) for a threshold selection not checked yet, where the keep_mask kernel
        checks in its pass (registry ``CHECKS_FINITE``: "cpp", "cuda"; on CUDA no launch of its own
        where the Python check made 5); elsewhere the selection is checked in Python first. While
        uncached (compiling: no registry either) a threshold is checked by keep_mask."""
        if _ops._uncached():
            return (*self._selection(scores, False), self.threshold is not None)
        thr, cut = self._selection(scores, True)
        if self.threshold is None or self._cache.checked:  # a top-k (its select checks) or a checked threshold
            return thr, cut, False
        if backends.checks_finite("keep_mask", scores.device.type, scores.dtype):
            return thr, cut, True
        return (*self._selection(scores, False), False)

    def mask(self) -> Tensor:
        """The current binary mask (of the scores' shape)."""
        scores = self.scores
        thr, cut, check = self._keep_selection(scores)
        return _ops.keep_mask(scores.detach(), thr, cut, 0, check)

    def _rule_repr(self) -> str:
        rule = f"density={self.density}" if self.density is not None else f"threshold={self.threshold}"
        return f"{rule}, estimator={self.estimator}"
