"""GPU benchmarks of exact top-k selection (targets 2-4 of docs/prior-art.md), for the GPU suite and pytest-benchmark.

Cases (format: docs/gpu_suite.md), for each GPU backend ("cuda", "triton"):

* ``select_25M_fp32_cold`` / ``_warm``: one tensor of 25 M fp32 scores, k = numel/2; warm is
  hinted with the threshold from before one small optimiser-like step (scores += 1e-4 * noise).
  Targets: <= 100 us cold, <= 50 us warm. Baselines: torch.sort, torch.kthvalue, torch.topk.
* ``select_resnet50_batched``: the 54 ResNet-50 weight tensors (25.5 M), one k each (density
  0.5), in one call. Target <= 150 us. Baselines: a loop of kthvalue / topk / sort per layer.
* ``select_bert_base_global``: one k over ~110 M scores in the BERT-base weight tensors, without
  concatenating them. Target <= 300 us. Baselines: cat + topk / kthvalue / sort.

Every case checks its result against the reference (bit for bit) before it is timed.
``gpu_cases(dry_run=True)`` builds the same cases 10^4 times smaller on the CPU with the
reference backend, to check the suite's wiring without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from bise_kernels.backends import BackendUnavailableError, kernel_table
from bise_kernels.backends import reference as ref
from model_shapes import bert_base_weight_shapes, resnet50_weight_shapes

GPU_BACKENDS = ("cuda", "triton")
DENSITY = 0.5
SINGLE_NUMEL = 25_000_000
WARM_STEP = 1e-4


def _scaled(shape: tuple[int, ...], scale: float) -> tuple[int, ...]:
    return (max(1, round(shape[0] * scale)),) + shape[1:] if scale < 1 else shape


def _check_same(got, want) -> None:
    thr, cut = got
    want_thr, want_cut = want
    if not (torch.equal(thr.reshape(-1), want_thr.reshape(-1)) and torch.equal(cut.reshape(-1), want_cut.reshape(-1))):
        raise AssertionError(f"selection differs from the reference: got ({thr}, {cut}), want ({want_thr}, {want_cut})")


def _kernels(backend: str):
    try:
        return kernel_table(backend), None
    except BackendUnavailableError as exc:
        return None, f"backend {backend!r} unavailable: {exc}"


def _single_cases(backends, device, scale) -> list[dict]:
    n = max(1000, round(SINGLE_NUMEL * scale))
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, device=device, generator=g)
    k = round(DENSITY * n)
    x_warm = x + WARM_STEP * torch.randn(n, device=device, generator=g)
    baselines = {
        "torch.sort": lambda: torch.sort(x, descending=True),
        "torch.kthvalue": lambda: torch.kthvalue(x, n - k + 1),
        "torch.topk": lambda: torch.topk(x, k),
    }
    cases = []
    for backend in backends:
        kernels, why = _kernels(backend)
        for warm in (False, True):
            name = f"select_25M_fp32_{'warm' if warm else 'cold'}/{backend}"
            if kernels is None:
                cases.append({"name": name, "backend": backend, "skip": why})
                continue
            select = kernels["topk_select"]
            scores = x_warm if warm else x
            hint = select([x], k, None)[0] if warm else None  # the step before's threshold
            cases.append({
                "name": name, "backend": backend, "target_us": 50.0 if warm else 100.0,
                "fn": lambda s=scores, h=hint, f=select: f([s], k, h),
                "check": lambda s=scores, h=hint, f=select: _check_same(f([s], k, h), ref.topk_select([s], k)),
                "baselines": baselines, "bytes": n * 4, "numel": n,
            })
    return cases


def _batched_cases(backends, device, scale) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(1)
    layers = [torch.randn(_scaled(s, scale), device=device, generator=g) for s in resnet50_weight_shapes()]
    ks = [max(1, round(DENSITY * t.numel())) for t in layers]
    numel = sum(t.numel() for t in layers)
    baselines = {
        "loop torch.kthvalue": lambda: [torch.kthvalue(t.reshape(-1), t.numel() - k + 1) for t, k in zip(layers, ks)],
        "loop torch.topk": lambda: [torch.topk(t.reshape(-1), k) for t, k in zip(layers, ks)],
        "loop torch.sort": lambda: [torch.sort(t.reshape(-1), descending=True) for t in layers],
    }
    cases = []
    for backend in backends:
        kernels, why = _kernels(backend)
        name = f"select_resnet50_batched/{backend}"
        if kernels is None:
            cases.append({"name": name, "backend": backend, "skip": why})
            continue
        batched = kernels["batched_topk_select"]
        cases.append({
            "name": name, "backend": backend, "target_us": 150.0,
            "fn": lambda f=batched: f(layers, ks, None),
            "check": lambda f=batched: _check_same(f(layers, ks, None), ref.batched_topk_select(layers, ks)),
            "baselines": baselines, "bytes": numel * 4, "numel": numel, "tensors": len(layers),
        })
    return cases


def _global_cases(backends, device, scale) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(2)
    tensors = [torch.randn(_scaled(s, scale), device=device, generator=g) for s in bert_base_weight_shapes()]
    numel = sum(t.numel() for t in tensors)
    k = round(DENSITY * numel)

    def cat():
        return torch.cat([t.reshape(-1) for t in tensors])

    baselines = {
        "cat+torch.topk": lambda: torch.topk(cat(), k),
        "cat+torch.kthvalue": lambda: torch.kthvalue(cat(), numel - k + 1),
        "cat+torch.sort": lambda: torch.sort(cat(), descending=True),
    }
    cases = []
    for backend in backends:
        kernels, why = _kernels(backend)
        name = f"select_bert_base_global/{backend}"
        if kernels is None:
            cases.append({"name": name, "backend": backend, "skip": why})
            continue
        select = kernels["topk_select"]
        cases.append({
            "name": name, "backend": backend, "target_us": 300.0,
            "fn": lambda f=select: f(tensors, k, None),
            "check": lambda f=select: _check_same(f(tensors, k, None), ref.topk_select(tensors, k)),
            "baselines": baselines, "bytes": numel * 4, "numel": numel, "tensors": len(tensors),
        })
    return cases


def gpu_cases(dry_run: bool = False) -> list[dict]:
    """Every selection case; allocates ~0.7 GB on the GPU. ``dry_run``: tiny, CPU, reference backend."""
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("bench_select_gpu cases need a CUDA device (or dry_run=True)")
    backends, device, scale = (("torch",), "cpu", 1e-4) if dry_run else (GPU_BACKENDS, "cuda", 1.0)
    return (_single_cases(backends, device, scale) + _batched_cases(backends, device, scale)
            + _global_cases(backends, device, scale))


# ----------------------------------------------------------------------------- pytest-benchmark


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU selection benchmarks need CUDA")


@pytest.fixture(scope="module")
def cases():
    return {c["name"]: c for c in gpu_cases()}


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["select_25M_fp32_cold", "select_25M_fp32_warm", "select_resnet50_batched",
                                  "select_bert_base_global"])
def test_select_gpu(benchmark, cases, kind, backend):
    case = cases[f"{kind}/{backend}"]
    if "skip" in case:
        pytest.skip(case["skip"])
    case["check"]()

    def run():
        case["fn"]()
        torch.cuda.synchronize()

    benchmark(run)
