"""The selection cases every backend runs (tests/kernels/test_select_kernels.py), at any size.

Each takes a backend's kernel table and a device, runs the kernels there and compares thresholds
(bit for bit) and cuts (exactly) with the reference backend computed on the CPU.
"""

import pytest
import torch

from _oracle import adversarial_inputs
from bise_kernels.backends import BACKENDS
from bise_kernels.backends import reference as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def skip_unless_supported(backend: str, dtype: torch.dtype) -> None:
    """Skip a case whose scores ``backend``'s selection does not take (its ``DTYPES``): the registry
    runs those on the next backend of its order (tests/kernels/test_registry_dtypes.py)."""
    if not BACKENDS[backend].supports("topk_select", dtype):
        pytest.skip(f"backend {backend!r} takes no {dtype} scores")


INT_OF_WIDTH = {8: torch.int64, 4: torch.int32, 2: torch.int16}
"""The integer dtype of each float width in bytes (raw bit patterns)."""


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns, so that -0.0 and +0.0 (and every other value) must match exactly."""
    return t.cpu().view(INT_OF_WIDTH[t.element_size()])


def assert_same_selection(got, want, what) -> None:
    (thr, cut), (want_thr, want_cut) = got, want
    assert thr.dtype == want_thr.dtype and thr.shape == want_thr.shape, (what, thr, want_thr)
    assert cut.dtype == torch.int64 and cut.shape == want_cut.shape, (what, cut, want_cut)
    assert torch.equal(bits(thr), bits(want_thr)), (what, thr, want_thr)
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


def check_topk_keep_mask(kernels, device, tensors, ks, hint=None) -> None:
    """topk_keep_mask: bit for bit the reference's masks (topk_select, then keep_mask per tensor)."""
    on_device = [t.to(device) for t in tensors]
    for k in ks:
        got = kernels["topk_keep_mask"](on_device, k, None if hint is None else hint.to(device))
        want = ref.topk_keep_mask(tensors, k)
        assert len(got) == len(want), k
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.dtype == torch.bool and g.shape == w.shape, (k, i, g.shape)
            assert torch.equal(g.cpu(), w), (k, i, int((g.cpu() != w).sum()))


# ----------------------------------------------------------------------------- the small case set

SMALL_CASES = {}
"""name -> check(kernels, device): every selection path at sizes the Triton interpreter affords."""
CASE_DTYPE = {}
"""name -> the dtype of the scores of a case written for one dtype (the others use float32 and bfloat16)."""


def _case(fn):
    SMALL_CASES[fn.__name__] = fn
    return fn


def _adversarial(dtype):
    def check(kernels, device):
        check_adversarial(kernels, device, 131, dtype, (1, 2, 66, 130, 131))
    return check


def _keep_mask(dtype):
    def check(kernels, device):
        x = torch.randint(-2, 3, (5, 41), generator=torch.Generator().manual_seed(7)).to(dtype)
        x[0, :7] = -0.0
        check_keep_mask(kernels, device, x, 90, offset=13)
    return check


for _dtype in DTYPES:
    for _name, _check in (("adversarial", _adversarial), ("keep_mask", _keep_mask)):
        SMALL_CASES[f"{_name}_{str(_dtype).split('.')[-1]}"] = _check(_dtype)
        CASE_DTYPE[f"{_name}_{str(_dtype).split('.')[-1]}"] = _dtype


@_case
def every_k_on_a_tied_tensor(kernels, device):
    check_every_k(kernels, device, torch.tensor([2.0, -0.0, 1, 2, 0.0, -3, 2, 1, 1, 5, 0.0, 2, -1, 2, 7, 1]))


@_case
def hints(kernels, device):
    for dtype in (torch.float32, torch.bfloat16):
        check_hints(kernels, device, torch.randn(300, generator=torch.Generator().manual_seed(3)).to(dtype), 120)


@_case
def global_list_without_concatenation(kernels, device):
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randint(0, 5, s, generator=g).float() for s in [(3, 50), (7,), (2, 3, 2), (1,), (140,)]]
    check_list(kernels, device, tensors, (1, 100, 310))
    check_list(kernels, device, tensors, (200,), hint=torch.tensor(2.0))


@_case
def batched_own_k_per_tensor(kernels, device):
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(150, generator=g), torch.zeros(9), torch.randint(0, 3, (4, 20), generator=g).float(),
               torch.randn(1, generator=g)]
    ks = [75, 4, 33, 1]
    check_batched(kernels, device, tensors, ks)
    check_batched(kernels, device, tensors, ks, hints=torch.tensor([0.0, 0.0, 1.0, 9.0]))


@_case
def all_equal_scores_cut_through_one_tie_group(kernels, device):
    x = torch.zeros(1100)
    x[::7] = -0.0
    check_list(kernels, device, [x], (1, 700, 1100))


@_case
def non_contiguous_in_logical_order(kernels, device):
    check_list(kernels, device, [torch.randint(0, 4, (9, 15), generator=torch.Generator().manual_seed(6)).float().t()],
               (50,))

