"""Masked MLP / small-CNN training step on CPU: the "cpp" backend vs dense vs edge-popup (target 9 of docs/prior-art.md).

One step = forward, cross-entropy, backward. "dense" trains the weights of the unmasked network;
"cpp" and "edgepopup" freeze the weights and train one score per weight, keeping the top half
(density 0.5) of each layer at every step (selection included); "cpp_threshold" keeps scores >= 0
instead (no top-k: the fused layers' own cost). "edgepopup" is the reference implementation of
Ramanujan et al.: clone |S|, full sort, two scatters, W * mask, F.linear / F.conv2d, straight-through
backward. "materialise" / "materialise_threshold" are what a user writes by hand in plain PyTorch, the
strongest baselines: the same top-k (``torch.kthvalue`` of the scores) or ``scores >= 0``, then
``W * (mask + s - s.detach())`` (the straight-through estimator) and the dense op; they compute the same
gradients as "cpp" / "cpp_threshold" (checked before timing). The variants run side by side in one
session (group = model); compare their times.

``extra_bytes_per_weight`` (extra_info) is the state autograd keeps beyond a dense step: bytes of
saved tensors that are neither parameters, scores nor the input, minus the dense step's, per weight.

The machine is shared and noisy, so ``test_masked_step_ratios`` also runs the variants interleaved
round by round on one thread (a preempted worker stalls every parallel region on a loaded box) and
records the median per-round time ratio to dense in its extra_info.
``test_masked_train_step_ratios`` does the same for the step a training script runs: the nn modules
(the selection cached per scores update and hinted by the last threshold) and an SGD step (momentum
0.9) on what is trained, so the scores change and are selected again at every step. Both record
``isa``, the level of torch's CPU kernels and of the cpp select (``ATEN_CPU_CAPABILITY=avx2``: a CPU
without AVX-512).
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bise_kernels as bk
import by_hand
from edgepopup import EdgePopupSubnet

DENSITY = 0.5
VARIANTS = ["dense", "cpp", "cpp_threshold", "edgepopup", "materialise", "materialise_threshold"]
SAME_STEP = {"materialise": "cpp", "materialise_threshold": "cpp_threshold"}
"""Baselines computing the gradients of a cpp variant: checked equal before any timing."""


def _layers(model: str, small: bool):
    """(kind, weight shape, conv kwargs) per layer, and the input shape."""
    if model == "mlp":
        width, batch = (256, 32) if small else (1024, 256)
        dims = [784, width, width, 10]
        return [("linear", (o, i), {}) for i, o in zip(dims, dims[1:])], (batch, 784)
    batch = 4 if small else 32
    convs = [((32, 3, 3, 3), dict(padding=1)), ((64, 32, 3, 3), dict(stride=2, padding=1)),
             ((64, 64, 3, 3), dict(stride=2, padding=1))]
    return [("conv", s, kw) for s, kw in convs] + [("linear", (10, 64), {})], (batch, 3, 32, 32)


def _forward(layers, weights, apply):
    def run(x):
        for i, ((kind, _, kw), w) in enumerate(zip(layers, weights)):
            if kind == "linear" and x.dim() == 4:
                x = x.mean((2, 3))
            x = apply(kind, x, w, i, kw)
            if i < len(layers) - 1:
                x = F.relu(x)
        return x
    return run


def _step_parts(model: str, variant: str, small: bool):
    layers, in_shape = _layers(model, small)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=g) * (2 / torch.Size(shape[1:]).numel()) ** 0.5 for _, shape, _ in layers]
    scores = [torch.randn(shape, generator=g).requires_grad_() for _, shape, _ in layers]
    x, y = torch.randn(in_shape, generator=g), torch.randint(0, 10, (in_shape[0],), generator=g)
    dense_op = {"linear": F.linear, "conv": F.conv2d}
    if variant == "dense":
        trained = [w.requires_grad_() for w in weights]
        apply = lambda kind, h, w, i, kw: dense_op[kind](h, w, **kw)  # noqa: E731
    elif variant.startswith("cpp"):
        trained = scores
        masked_op = {"linear": bk.masked_linear, "conv": bk.masked_conv2d}
        mask = dict(density=DENSITY) if variant == "cpp" else dict(threshold=0.0)
        apply = lambda kind, h, w, i, kw: masked_op[kind](h, w, None, scores[i], **mask, **kw)  # noqa: E731
    elif variant.startswith("materialise"):
        trained = scores
        apply = lambda kind, h, w, i, kw: dense_op[kind](h, _materialised(w, scores[i], variant), **kw)  # noqa: E731
    else:
        trained = scores
        apply = lambda kind, h, w, i, kw: dense_op[kind](  # noqa: E731
            h, w * EdgePopupSubnet.apply(scores[i].abs(), DENSITY), **kw)
    return _forward(layers, weights, apply), x, y, weights + scores, trained


def _materialised(w, s, variant: str):
    """W * mask by hand (by_hand.py): the top-k of the scores (distinct random scores: no ties), or ``s >= 0``."""
    thr = by_hand.top_k_threshold(s, DENSITY) if variant == "materialise" else 0.0
    return by_hand.masked_weight(w, s, by_hand.keep_mask(s, thr, w.dtype))


def _module_step_parts(model: str, variant: str, small: bool):
    """As :func:`_step_parts`, but the masked variants are the nn modules (MaskedLinear / MaskedConv2d
    wrapping the same weights, their scores the same values): what a training script runs, where the
    selection is cached per scores update and takes the last threshold as its hint."""
    forward, x, y, own, trained = _step_parts(model, variant, small)
    if not variant.startswith("cpp"):
        return forward, x, y, own, trained
    layers, _ = _layers(model, small)
    weights, scores = own[: len(layers)], own[len(layers):]
    masked = {"linear": (nn.Linear, bk.MaskedLinear), "conv": (nn.Conv2d, bk.MaskedConv2d)}
    mask = dict(density=DENSITY) if variant == "cpp" else dict(threshold=0.0)
    modules = []
    for (kind, shape, kw), w, s in zip(layers, weights, scores):
        dense_cls, masked_cls = masked[kind]
        dense = dense_cls(*shape[1::-1], *shape[2:3], bias=False, **kw)
        dense.weight = nn.Parameter(w.detach(), requires_grad=False)
        layer = masked_cls.from_dense(dense, **mask)
        with torch.no_grad():
            layer.scores.copy_(s)
        modules.append(layer)
    forward = _forward(layers, weights, lambda kind, h, w, i, kw: modules[i](h))
    return forward, x, y, [m.weight for m in modules] + [m.scores for m in modules], [m.scores for m in modules]


def _train_step(forward, x, y, trained, optimizer=None):
    """Forward, cross-entropy, backward; with ``optimizer``, also its step (the trained tensors change)."""
    for t in trained:
        t.grad = None
    F.cross_entropy(forward(x), y).backward()
    if optimizer is not None:
        optimizer.step()


def _saved_bytes(forward, x, y, own, trained) -> int:
    """Bytes of distinct storages autograd saves in a step that are not in ``own`` (params, scores) or x."""
    skip = {t.untyped_storage().data_ptr() for t in own + [x]}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(forward(x), y).backward()
    return sum(saved.values())


@pytest.mark.parametrize("model", ["mlp", "cnn"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_training_step_cpu(benchmark, model, variant):
    cpp = variant.startswith("cpp")
    if cpp and bk.why_unavailable("cpp"):
        pytest.skip(f"cpp backend unavailable: {bk.why_unavailable('cpp')}")
    small = benchmark.disabled
    benchmark.group = f"masked step cpu: {model}"
    with bk.use_backend("cpp" if cpp else "torch"):
        parts = _step_parts(model, variant, small)
        extra = _saved_bytes(*parts) - _saved_bytes(*_step_parts(model, "dense", small))
        forward, x, y, own, trained = parts
        benchmark.pedantic(_train_step, args=(forward, x, y, trained), rounds=1 if small else 20,
                           warmup_rounds=0 if small else 3)
    n_weights = sum(w.numel() for w in own[: len(own) // 2])
    benchmark.extra_info.update(extra_bytes_per_weight=extra / n_weights, weights=n_weights, batch=x.shape[0],
                                threads=torch.get_num_threads(), isa=torch.backends.cpu.get_cpu_capability())
    assert all(t.grad is not None and t.grad.shape == t.shape for t in trained)
    if cpp:
        assert extra / n_weights <= 1.0


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_masked_step_ratios(benchmark, model):
    """One round = one step of every variant in turn; extra_info holds median(variant / dense) per round."""
    _step_ratios(benchmark, model, _step_parts, with_optimizer=False)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_masked_train_step_ratios(benchmark, model):
    """As test_masked_step_ratios, for the step a training script runs: the nn modules (selection cached
    per scores update, hinted by the last threshold) and an SGD step (momentum 0.9) on what is trained
    (the weights for dense, the scores otherwise), so the scores change and are selected again every step."""
    _step_ratios(benchmark, model, _module_step_parts, with_optimizer=True)


def _step_ratios(benchmark, model, parts, with_optimizer):
    if bk.why_unavailable("cpp"):
        pytest.skip(f"cpp backend unavailable: {bk.why_unavailable('cpp')}")
    small = benchmark.disabled
    benchmark.group = f"masked {'train ' if with_optimizer else ''}step cpu ratios: {model}"
    for baseline, ours in SAME_STEP.items():  # the hand-written steps compute what the cpp ones do
        grads = []
        for v in (baseline, ours):
            forward, x, y, _, trained = parts(model, v, small)
            with bk.use_backend("cpp" if v.startswith("cpp") else "torch"):
                _train_step(forward, x, y, trained)
            grads.append([t.grad for t in trained])
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, msg=lambda m: f"{model} {baseline} vs {ours}: {m}")
    steps = {v: parts(model, v, small) for v in VARIANTS}
    optimizers = {v: torch.optim.SGD(steps[v][4], lr=0.01, momentum=0.9) if with_optimizer else None for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def one_round():
        for v, (forward, x, y, _, trained) in steps.items():
            with bk.use_backend("cpp" if v.startswith("cpp") else "torch"):
                start = time.perf_counter()
                _train_step(forward, x, y, trained, optimizers[v])
                times[v].append(time.perf_counter() - start)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        benchmark.pedantic(one_round, rounds=1 if small else 30, warmup_rounds=0 if small else 3)
    finally:
        torch.set_num_threads(threads)
    n = len(times["dense"]) - (0 if small else 3)  # drop the warmup rounds' times
    ratios = {v: statistics.median(t / d for t, d in zip(times[v][-n:], times["dense"][-n:])) for v in VARIANTS[1:]}
    benchmark.extra_info.update({f"{v}_over_dense": r for v, r in ratios.items()},
                                dense_median_ms=1e3 * statistics.median(times["dense"][-n:]),
                                isa=torch.backends.cpu.get_cpu_capability())
    for v in ("cpp", "cpp_threshold"):  # the cpp step that was timed computes the reference backend's gradients
        forward, x, y, _, trained = steps[v]
        with bk.use_backend("cpp"):  # one more, on the scores as they are now (an optimiser changed them)
            _train_step(forward, x, y, trained)
        timed = [t.grad for t in trained]
        with bk.use_backend("torch"):
            _train_step(forward, x, y, trained)
        assert all(t is not None for t in timed)
        for got, want in zip(timed, trained):
            torch.testing.assert_close(got, want.grad, msg=lambda m: f"{model} {v}: {m}")
