"""GPU benchmarks of exact top-k selection, for the GPU suite and pytest-benchmark.

Cases (format: docs/gpu_suite.md), for each GPU backend: "cuda" (its default radix select),
"cuda-bracket" (the same backend with BISE_SELECT_CUDA=bracket, docs/select.md) and "triton":

* ``select_25M_fp32_cold`` / ``_warm``: one tensor of 25 M fp32 scores, k = numel/2; warm is
  hinted with the threshold from before one small optimiser-like step (scores += 1e-4 * noise).
  Targets, as ratios to the case's ``one_read`` (device-independent; issue #14): <= 2x one read cold
  (~50 us on an H200, ~60 us on an H100), <= 1.3x warm. ``select_12M_fp64_cold``: the same 100 MB as
  12.5 M float64 scores, CUDA backends only (same target).
* ``select_keep_mask_25M_fp32``: the keep mask of the top half through ``topk_keep_mask`` (select and
  mask in one op), beside the same backend's ``topk_select`` then ``keep_mask`` and torch.topk +
  scatter.
* ``select_resnet50_batched``: the 54 ResNet-50 weight tensors (25.5 M), one k each (density
  0.5), in one call. Target <= 150 us. Baselines: a loop of kthvalue / topk / sort per layer.
* ``select_bert_base_global``: one k over ~110 M scores in the BERT-base weight tensors, without
  concatenating them. Target <= 300 us. Baselines: cat + topk / kthvalue / sort.

Every case has the baseline ``one_read`` (``x.sum()`` over the same data: the memory floor)
beside torch's sort / topk / kthvalue. The backends' cases of one input share their baseline
callables, which the suite times once (kthvalue alone takes 0.1-0.6 s a call at full size).
The single-tensor and global cases also run through the
public API (``bise_kernels.topk_select``, backend "auto": checks included), named ``.../api``,
with the raw kernel that "auto" picks as the baseline ``raw_kernel``: ``overhead_us`` is the
API's cost (target <= 10 us). Every case checks its result against the reference (bit for bit)
before it is timed. ``gpu_cases(dry_run=True)`` builds the same cases 10^4 times smaller on the
CPU with the reference backend, to check the suite's wiring without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

import bise_kernels
from bise_kernels.backends import BackendUnavailableError, kernel_table, resolve
from bise_kernels.backends import reference as ref
from model_shapes import bert_base_weight_shapes, resnet50_weight_shapes

GPU_BACKENDS = ("cuda", "cuda-bracket", "triton")
CUDA_ALGORITHMS = {"cuda": "radix", "cuda-bracket": "bracket"}
"""The algorithm (BISE_SELECT_CUDA, csrc/cuda/select_binding.cpp) of each name of the CUDA backend."""
DENSITY = 0.5
SINGLE_NUMEL = 25_000_000
WARM_STEP = 1e-4
API_OVERHEAD_US = 10.0
COLD_READS, WARM_READS = 2.0, 1.3
"""A single tensor's selection takes at most this many times one read of it (``one_read``), cold and hinted."""


def _scaled(shape: tuple[int, ...], scale: float) -> tuple[int, ...]:
    return (max(1, round(shape[0] * scale)),) + shape[1:] if scale < 1 else shape


def _check_same(got, want) -> None:
    thr, cut = got
    want_thr, want_cut = want
    if not (torch.equal(thr.reshape(-1), want_thr.reshape(-1)) and torch.equal(cut.reshape(-1), want_cut.reshape(-1))):
        raise AssertionError(f"selection differs from the reference: got ({thr}, {cut}), want ({want_thr}, {want_cut})")


def _kernel(backend: str, kernel: str):
    """``backend``'s ``kernel``; a CUDA name runs it with its algorithm set for the call only."""
    f = kernel_table(backend.split("-")[0])[kernel]
    algo = CUDA_ALGORITHMS.get(backend)
    if algo is None:
        return f

    def with_algorithm(*args):
        before = os.environ.get("BISE_SELECT_CUDA")
        os.environ["BISE_SELECT_CUDA"] = algo
        try:
            return f(*args)
        finally:
            if before is None:
                del os.environ["BISE_SELECT_CUDA"]
            else:
                os.environ["BISE_SELECT_CUDA"] = before

    return with_algorithm


def _one_read(tensors):
    return lambda: [t.sum() for t in tensors]


def _check_masks(got, want) -> None:
    if len(got) != len(want) or not all(torch.equal(g, w) for g, w in zip(got, want)):
        raise AssertionError("keep masks differ from the reference")


def _skipped(case: dict, exc: Exception) -> dict:
    """``case`` recorded as skipped: its backend is unavailable (``exc`` says why)."""
    return dict(case, skip=f"backend {case['backend']!r} unavailable: {exc}")


def _cases(name: str, backends, kernel: str, call, want, baselines: dict, api=None, same=_check_same,
           **fields) -> list[dict]:
    """One case per backend (skipped where it is unavailable): ``call(f)`` runs the backend's
    ``kernel`` f; ``want()`` is the reference result, compared by ``same``. ``api``: the public-API
    call, timed beside the raw kernel that "auto" resolves to."""
    cases = []
    for backend in backends:
        case = dict(fields, name=f"{name}/{backend}", backend=backend)
        try:
            f = _kernel(backend, kernel)
        except BackendUnavailableError as exc:
            cases.append(_skipped(case, exc))
            continue
        cases.append(dict(case, fn=lambda f=f: call(f), check=lambda f=f: same(call(f), want()),
                          baselines=baselines))
    if api is not None:
        device = fields["device"]
        auto, f = resolve(kernel, device)
        # "latency": each call synchronised, so the API's host checks cannot hide behind the kernel
        cases.append(dict(fields, name=f"{name}/api", backend=f"api ({auto})", fn=api, timer="latency",
                          check=lambda: same(api(), want()), overhead_vs="raw_kernel",
                          target_overhead_us=API_OVERHEAD_US, target_us=None, target_speedup=None,
                          baselines={"raw_kernel": lambda f=f: call(f)}))
    for case in cases:
        case.pop("device", None)
    return cases


def _single_cases(backends, device, scale, dtype=torch.float32, warm=True) -> list[dict]:
    """One tensor of 100 MB (25 M fp32, or 12.5 M fp64: cold only), k = numel / 2."""
    n = max(1000, round(SINGLE_NUMEL * 4 // dtype.itemsize * scale))
    name = "select_25M_fp32" if dtype == torch.float32 else "select_12M_fp64"
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, device=device, dtype=dtype, generator=g)
    k = round(DENSITY * n)
    x_warm = x + WARM_STEP * torch.randn(n, device=device, dtype=dtype, generator=g)
    hint = ref.topk_select([x], k)[0]  # the step before's threshold
    cases = []
    # (hinted, scores, hint, most times one read): target_speedup one_read >= 1 / that
    for hinted, scores, h, reads in ((False, x, None, COLD_READS), (True, x_warm, hint, WARM_READS))[:2 if warm else 1]:
        baselines = {
            "one_read": _one_read([scores]),
            "torch.sort": lambda s=scores: torch.sort(s, descending=True),
            "torch.kthvalue": lambda s=scores: torch.kthvalue(s, n - k + 1),
            "torch.topk": lambda s=scores: torch.topk(s, k, sorted=False),
        }
        cases += _cases(f"{name}_{'warm' if hinted else 'cold'}", backends, "topk_select",
                        lambda f, s=scores, h=h: f([s], k, h), lambda s=scores: ref.topk_select([s], k), baselines,
                        api=lambda s=scores, h=h: bise_kernels.topk_select(s, k, hint=h),
                        target_speedup={"one_read": 1 / reads}, bytes=n * dtype.itemsize, numel=n, device=device)
    return cases


def _batched_cases(backends, device, scale) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(1)
    layers = [torch.randn(_scaled(s, scale), device=device, generator=g) for s in resnet50_weight_shapes()]
    ks = [max(1, round(DENSITY * t.numel())) for t in layers]
    numel = sum(t.numel() for t in layers)
    baselines = {
        "one_read": _one_read(layers),
        "loop torch.kthvalue": lambda: [torch.kthvalue(t.reshape(-1), t.numel() - k + 1) for t, k in zip(layers, ks)],
        "loop torch.topk": lambda: [torch.topk(t.reshape(-1), k, sorted=False) for t, k in zip(layers, ks)],
        "loop torch.sort": lambda: [torch.sort(t.reshape(-1), descending=True) for t in layers],
    }
    return _cases("select_resnet50_batched", backends, "batched_topk_select", lambda f: f(layers, ks, None),
                  lambda: ref.batched_topk_select(layers, ks), baselines, target_us=150.0, bytes=numel * 4,
                  numel=numel, tensors=len(layers), device=device)


def _global_cases(backends, device, scale) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(2)
    tensors = [torch.randn(_scaled(s, scale), device=device, generator=g) for s in bert_base_weight_shapes()]
    numel = sum(t.numel() for t in tensors)
    k = round(DENSITY * numel)

    def cat():
        return torch.cat([t.reshape(-1) for t in tensors])

    baselines = {
        "one_read": _one_read(tensors),
        "cat+torch.topk": lambda: torch.topk(cat(), k, sorted=False),
        "cat+torch.kthvalue": lambda: torch.kthvalue(cat(), numel - k + 1),
        "cat+torch.sort": lambda: torch.sort(cat(), descending=True),
    }
    return _cases("select_bert_base_global", backends, "topk_select", lambda f: f(tensors, k, None),
                  lambda: ref.topk_select(tensors, k), baselines, api=lambda: bise_kernels.topk_select(tensors, k),
                  target_us=300.0, bytes=numel * 4, numel=numel, tensors=len(tensors), device=device)


def _keep_mask_cases(backends, device, scale) -> list[dict]:
    """The keep mask of the top half of 25 M fp32 scores: topk_keep_mask (the select writing the mask
    in its own pass where it can) against the same backend's topk_select then keep_mask."""
    n = max(1000, round(SINGLE_NUMEL * scale))
    x = torch.randn(n, device=device, generator=torch.Generator(device=device).manual_seed(3))
    k = round(DENSITY * n)
    # one callable per input for the baselines every backend shares: the suite times each once
    shared = {"one_read": _one_read([x]), "torch.topk+scatter": lambda: torch.zeros(n, dtype=torch.bool, device=device)
              .scatter_(0, torch.topk(x, k, sorted=False).indices, True)}
    cases = []
    for backend in backends:
        try:
            select, keep = _kernel(backend, "topk_select"), _kernel(backend, "keep_mask")
        except (BackendUnavailableError, KeyError) as exc:
            cases.append(_skipped({"name": f"select_keep_mask_25M_fp32/{backend}", "backend": backend}, exc))
            continue
        baselines = {"one_read": shared["one_read"],
                     "select+keep_mask": lambda s=select, m=keep: m(x, *s([x], k, None), 0),
                     "torch.topk+scatter": shared["torch.topk+scatter"]}
        cases += _cases("select_keep_mask_25M_fp32", (backend,), "topk_keep_mask", lambda f: f([x], k, None),
                        lambda: ref.topk_keep_mask([x], k), baselines, same=_check_masks, target_us=None,
                        bytes=n * 5, numel=n, device=device)
    return cases


def gpu_cases(dry_run: bool = False) -> list[dict]:
    """Every selection case; allocates ~0.8 GB on the GPU. ``dry_run``: tiny, CPU, reference backend."""
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("bench_select_gpu cases need a CUDA device (or dry_run=True)")
    backends, device, scale = (("torch",), "cpu", 1e-4) if dry_run else (GPU_BACKENDS, "cuda", 1.0)
    cuda_only = tuple(b for b in backends if b != "triton")  # the Triton select takes no float64
    return (_single_cases(backends, device, scale) + _batched_cases(backends, device, scale)
            + _global_cases(backends, device, scale)
            + _single_cases(cuda_only, device, scale, dtype=torch.float64, warm=False)
            + _keep_mask_cases(cuda_only, device, scale))


# ----------------------------------------------------------------------------- pytest-benchmark


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU selection benchmarks need CUDA")


@pytest.fixture(scope="module")
def cases():
    return {c["name"]: c for c in gpu_cases()}


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["select_25M_fp32_cold", "select_25M_fp32_warm", "select_resnet50_batched",
                                  "select_bert_base_global", "select_12M_fp64_cold"])
def test_select_gpu(benchmark, cases, kind, backend):
    case = cases.get(f"{kind}/{backend}", {"skip": f"no {kind} case for {backend}"})
    if "skip" in case:
        pytest.skip(case["skip"])
    case["check"]()

    def run():
        case["fn"]()
        torch.cuda.synchronize()

    benchmark(run)
