"""The selection cases every backend runs (tests/kernels/test_select_kernels.py), at any size.

Each takes a backend's kernel table and a device, runs the kernels there and compares thresholds
(bit for bit) and cuts (exactly) with the reference backend computed on the CPU.
"""

import torch

from _oracle import adversarial_inputs
from bise_kernels.backends import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so that -0.0 and +0.0 (and every other value) must match exactly."""
    return t.cpu().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_selection(got, want, what) -> None:
    (thr, cut), (want_thr, want_cut) = got, want
    assert thr.dtype == want_thr.dtype and thr.shape == want_thr.shape, (what, thr, want_thr)
    assert cut.dtype == torch.int64 and cut.shape == want_cut.shape, (what, cut, want_cut)
    assert torch.equal(_bits(thr), _bits(want_thr)), (what, thr, want_thr)
    assert torch.equal(cut.cpu(), want_cut), (what, cut, want_cut)


def check_adversarial(kernels, device, n: int, dtype: torch.dtype, ks) -> None:
    """Random, all-equal, few values, sorted, reverse-sorted, +-0.0, denormal, huge."""
    for name, x in adversarial_inputs(n, dtype).items():
        for k in ks:
            got = kernels["topk_select"]([x.to(device)], k, None)
            assert_same_selection(got, ref.topk_select([x], k), (name, k))


def check_every_k(kernels, device, x: torch.Tensor) -> None:
    for k in range(1, x.numel() + 1):
        assert_same_selection(kernels["topk_select"]([x.to(device)], k, None), ref.topk_select([x], k), k)


def check_hints(kernels, device, x: torch.Tensor, k: int) -> None:
    """Exact hint (one pass), near and far hints (partial and missed warm start), +-0.0 and NaN hints."""
    exact = ref.topk_select([x], k)[0]
    near = exact + torch.finfo(x.dtype).eps * exact.abs().clamp(min=1)
    hints = [exact, near, exact * 0.5 + 1, torch.tensor(-0.0), torch.tensor(float("nan")), torch.tensor(1e30)]
    for hint in hints:
        hint = hint.to(x.dtype).reshape(())
        got = kernels["topk_select"]([x.to(device)], k, hint.to(device))
        assert_same_selection(got, ref.topk_select([x], k), hint)


def check_list(kernels, device, tensors, ks, hint=None) -> None:
    """Global mode: one selection over the virtual concatenation (in list order)."""
    on_device = [t.to(device) for t in tensors]
    for k in ks:
        h = None if hint is None else hint.to(device)
        assert_same_selection(kernels["topk_select"](on_device, k, h), ref.topk_select(tensors, k), k)


def check_batched(kernels, device, tensors, ks, hints=None) -> None:
    """Layerwise mode: one independent selection per tensor, each with its own k."""
    on_device = [t.to(device) for t in tensors]
    h = None if hints is None else hints.to(device)
    got = kernels["batched_topk_select"](on_device, ks, h)
    assert_same_selection(got, ref.batched_topk_select(tensors, ks), ks)


def check_keep_mask(kernels, device, x: torch.Tensor, k: int, offset: int) -> None:
    thr, cut = ref.topk_select([x], k)
    cut = cut + offset
    got = kernels["keep_mask"](x.to(device), thr.to(device), cut.to(device), offset)
    assert got.dtype == torch.bool and got.shape == x.shape
    assert torch.equal(got.cpu(), ref.keep_mask(x, thr, cut, offset))
