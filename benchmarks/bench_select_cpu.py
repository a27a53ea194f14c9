"""CPU exact top-k selection: the "cpp" backend against torch baselines, side by side (targets 1, 3 of docs/prior-art.md).

Groups (compare within a group; one process, same data):

* ``select-25M`` / ``select-1M``: fp32 randn, k = numel/2. One full read (``x.sum()``), the cpp
  selection cold and warm-started (hint = the threshold before a small score update), the
  selection then its keep mask, the two in one op (``topk_keep_mask``), torch.kthvalue and
  torch.topk; ``*_1thread`` cases repeat the read, the selections and the public
  ``bise_kernels.topk_select`` (checks included, backend "auto") on one thread (a per-core cost
  that other load on a shared box disturbs far less than a 2-thread parallel region).
* ``select-resnet50``: the 54 ResNet-50 weight shapes (25.5 M scores), k = numel/2 each: one
  batched cpp call (cold, warm, one thread) vs a Python loop of torch.kthvalue, and one read of
  every tensor (54 sums; on 2 threads that is 54 parallel regions, so the 1-thread read is the
  fairer reference).

With ``--benchmark-disable`` (CI) sizes shrink to 1 M / 100 k and ResNet-50 channels by 4. Each case records
``isa``, the level of torch's CPU kernels, which also picks the cpp select's scan: ``ATEN_CPU_CAPABILITY=avx2``
(or ``default``) measures on this CPU what a CPU without AVX-512 (or AVX2) runs.
"""

import pytest
import torch

import bise_kernels
from bise_kernels.backends import kernel_table
from bise_kernels.backends import reference as ref
from model_shapes import resnet50_weight_shapes

try:
    CPP = kernel_table("cpp")
except Exception as exc:  # noqa: BLE001 - the compiled extension is optional
    pytest.skip(f"cpp backend unavailable: {exc}", allow_module_level=True)


def _run(benchmark, fn, slow=False):
    """Slow baselines get fewer rounds; every case records its median in ms for the docs."""
    if slow:
        benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    else:
        benchmark.pedantic(fn, rounds=30, warmup_rounds=3)


def _run_threads(benchmark, fn, case):
    """``*_1thread`` cases run on one thread: a per-core cost, far less disturbed by other load."""
    threads = torch.get_num_threads()
    if case.endswith("_1thread"):
        torch.set_num_threads(1)
    try:
        _run(benchmark, fn, slow=case.startswith("torch_"))
    finally:
        torch.set_num_threads(threads)


CASES = ["one_read_sum", "cpp_cold", "cpp_warm", "cpp_select_and_mask", "cpp_topk_keep_mask", "torch_kthvalue",
         "torch_topk", "one_read_sum_1thread", "cpp_cold_1thread", "cpp_warm_1thread", "api_topk_select_1thread",
         "cpp_select_and_mask_1thread", "cpp_topk_keep_mask_1thread"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("size", ["25M", "1M"])
def test_select_single_tensor(benchmark, case, size):
    n = {"25M": 25_000_000, "1M": 1_000_000}[size]
    if benchmark.disabled:
        n //= 25 if size == "25M" else 10
    benchmark.group = f"select-{size}"
    g = torch.Generator().manual_seed(0)
    before = torch.randn(n, generator=g)
    x = before + 1e-3 * torch.randn(n, generator=g)  # one small optimiser step later
    k = n // 2
    hint = CPP["topk_select"]([before], k, None)[0]
    benchmark.extra_info.update(numel=n, k=k, dtype="float32", threads=1 if case.endswith("_1thread") else torch.get_num_threads(),
                                isa=torch.backends.cpu.get_cpu_capability())
    fns = {
        "one_read_sum": lambda: x.sum(),
        "one_read_sum_1thread": lambda: x.sum(),
        "cpp_cold_1thread": lambda: CPP["topk_select"]([x], k, None),
        "cpp_warm_1thread": lambda: CPP["topk_select"]([x], k, hint),
        "cpp_cold": lambda: CPP["topk_select"]([x], k, None),
        "cpp_warm": lambda: CPP["topk_select"]([x], k, hint),
        "cpp_select_and_mask": lambda: CPP["keep_mask"](x, *CPP["topk_select"]([x], k, None), 0),
        "cpp_select_and_mask_1thread": lambda: CPP["keep_mask"](x, *CPP["topk_select"]([x], k, None), 0),
        "cpp_topk_keep_mask": lambda: CPP["topk_keep_mask"]([x], k, None),
        "cpp_topk_keep_mask_1thread": lambda: CPP["topk_keep_mask"]([x], k, None),
        "api_topk_select_1thread": lambda: bise_kernels.topk_select(x, k),
        "torch_kthvalue": lambda: torch.kthvalue(x, n - k + 1),
        "torch_topk": lambda: torch.topk(x, k, sorted=False),
    }
    # checked before it is timed, in every run (the timed one too: a fast wrong kernel must not pass)
    _check_single(case, fns[case](), x, k, _reference(("single", n), lambda: ref.topk_select([x], k)))
    _run_threads(benchmark, fns[case], case)


_REFERENCE: dict = {}
"""The reference's selection per input (a stable sort of 25 M takes seconds: made once per size)."""


def _reference(key, make):
    if key not in _REFERENCE:
        _REFERENCE[key] = make()
    return _REFERENCE[key]


def _check_single(case, got, x, k, want):
    if case.startswith(("cpp_cold", "cpp_warm", "api_topk_select")):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), case
    elif case.startswith(("cpp_select_and_mask", "cpp_topk_keep_mask")):
        mask = got[0] if isinstance(got, list) else got
        assert torch.equal(mask, ref.keep_mask(x, *want)), case


@pytest.mark.parametrize("case", ["one_read_sum", "cpp_batched", "cpp_batched_warm", "torch_kthvalue_loop",
                                  "one_read_sum_1thread", "cpp_batched_1thread"])
def test_select_resnet50_layers(benchmark, case):
    shapes = resnet50_weight_shapes(4 if benchmark.disabled else 1)
    benchmark.group = "select-resnet50"
    g = torch.Generator().manual_seed(1)
    before = [torch.randn(s, generator=g) for s in shapes]
    layers = [t + 1e-3 * torch.randn(t.shape, generator=g) for t in before]
    ks = [t.numel() // 2 for t in layers]
    hints = CPP["batched_topk_select"](before, ks, None)[0]
    benchmark.extra_info.update(tensors=len(layers), numel=sum(t.numel() for t in layers), dtype="float32",
                                threads=1 if case.endswith("_1thread") else torch.get_num_threads(),
                                isa=torch.backends.cpu.get_cpu_capability())
    fns = {
        "one_read_sum": lambda: [t.sum() for t in layers],
        "one_read_sum_1thread": lambda: [t.sum() for t in layers],
        "cpp_batched_1thread": lambda: CPP["batched_topk_select"](layers, ks, None),
        "cpp_batched": lambda: CPP["batched_topk_select"](layers, ks, None),
        "cpp_batched_warm": lambda: CPP["batched_topk_select"](layers, ks, hints),
        "torch_kthvalue_loop": lambda: [torch.kthvalue(t.reshape(-1), t.numel() - k + 1) for t, k in zip(layers, ks)],
    }
    if case.startswith("cpp_batched"):  # checked before it is timed, in every run
        got = fns[case]()
        want = _reference(("resnet50", len(layers), sum(ks)), lambda: ref.batched_topk_select(layers, ks))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), case
    _run_threads(benchmark, fns[case], case)
