"""Every backend's selection kernels against the reference, bit for bit: the small case set of
_select_cases.py on every backend and device available here.

Each backend file adds only the sizes and paths it has (test_select_cpp.py: the sampling bracket;
test_select_cuda.py: GPU-sized inputs; test_select_triton.py: the candidate buffer, the chunk
geometry, the sm_90 compile).
"""

import pytest
import torch

from _select_cases import CASE_DTYPE, SMALL_CASES, skip_unless_supported


@pytest.mark.parametrize("case", list(SMALL_CASES))
def test_selection_matches_the_reference(kernels, case):
    skip_unless_supported(kernels.name, CASE_DTYPE.get(case, torch.float32))
    SMALL_CASES[case](vars(kernels), kernels.device)


# ----------------------------------------------------------------------------- keep_mask's check

from bise_kernels import _ops, backends  # noqa: E402
from bise_kernels.backends import reference as ref  # noqa: E402

KEEP_ALL_TIES = ref.KEEP_ALL_TIES


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", backends.available_backends("cpu"))
def test_keep_mask_checks_scores_and_thr_finite_when_asked(name, dtype):
    """Every CPU backend's keep_mask (the reference's included): with check_finite, a NaN / +-inf
    score (on either side of the tie cut) is a ValueError naming the scores and the bad value, a
    non-finite thr one naming the threshold; finite scores (+-max, -0.0) pass and the mask is the
    reference's; without check_finite nothing raises (a select's (thr, cut) was checked already)."""
    skip_unless_supported(name, dtype)
    keep_mask = backends.kernel_table(name)["keep_mask"]
    g = torch.Generator().manual_seed(41)
    x = torch.randn(3000, generator=g).to(dtype)
    info = torch.finfo(dtype)
    x[:3] = torch.tensor([info.max, -info.max, -0.0], dtype=dtype)
    x[1000:1100] = 0.5
    thr = torch.tensor(0.5, dtype=dtype)
    for cut in (torch.tensor(KEEP_ALL_TIES), torch.tensor(1050 + 7)):
        for check in (False, True):
            assert torch.equal(keep_mask(x, thr, cut, 7, check), ref.keep_mask(x, thr, cut, 7)), (cut, check)
    cut = torch.tensor(1050)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, 1020, 1080, 2999):
            y = x.clone()
            y[pos] = bad
            with pytest.raises(ValueError, match=f"^scores contains non-finite values \\(e.g. {bad}\\)"):
                keep_mask(y, thr, cut, 0, True)
            keep_mask(y, thr, cut, 0, False)
        with pytest.raises(ValueError, match=f"^threshold contains non-finite values \\(e.g. {bad}\\)"):
            keep_mask(x, torch.tensor(bad, dtype=dtype), cut, 0, True)


def test_keep_mask_op_checks_through_both_paths(backend):
    """_ops.keep_mask's check_finite reaches the kernel on the eager path and through the custom op."""
    x = torch.randn(40)
    x[33] = float("nan")
    thr, cut = torch.tensor(0.0), torch.tensor(KEEP_ALL_TIES)
    for call in (_ops.keep_mask, _ops.keep_mask.op):
        call(x, thr, cut, 0)
        with pytest.raises(ValueError, match="scores contains non-finite values"):
            call(x, thr, cut, 0, True)


@pytest.mark.parametrize("name", backends.available_backends("cpu"))
def test_keep_mask_names_the_threshold_first_when_both_are_bad(name):
    """NaN scores and a NaN thr: every backend's check names the threshold (the native kernels check
    thr before their pass over the scores; the Python ones must say the same)."""
    keep_mask = backends.kernel_table(name)["keep_mask"]
    x = torch.randn(50)
    x[7] = float("nan")
    with pytest.raises(ValueError, match="^threshold contains non-finite values"):
        keep_mask(x, torch.tensor(float("inf")), torch.tensor(KEEP_ALL_TIES), 0, True)


# ----------------------------------------------------------------------------- no copy of the results


def _storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_select_results_share_no_memory_with_the_inputs(backend):
    """The contract the select ops rely on to return the kernels' tensors uncopied (custom ops may
    not return an alias of an input): thr and cut of every backend are new memory, not the scores'
    or the hint's, also when the hint is the answer, k is n, or a tensor is a view."""
    g = torch.Generator().manual_seed(42)
    base = torch.randn(300, generator=g)
    scores = [base[:200], base[200:].reshape(10, 10), torch.randn(50, generator=g)]
    for k in (1, 20, 350):
        hint = ref.topk_select(scores, k)[0].clone()
        for h in (None, hint):
            thr, cut = _ops.topk_select(scores, k, h)
            assert not _storages([thr, cut]) & _storages([*scores, hint]), (k, h)
    hints = torch.stack([s.reshape(-1)[0] for s in scores])
    for h in (None, hints):
        thr, cut = _ops.batched_topk_select(scores, [1, 100, 50], h)
        assert not _storages([thr, cut]) & _storages([*scores, hints]), h


def test_the_select_ops_return_the_kernels_tensors(backend, monkeypatch):
    """No copy between the kernel and the caller (was a clone of thr and of cut per select: two
    launches on CUDA), on the eager path and through the custom op."""
    scores = [torch.randn(64), torch.randn(30)]
    for name, args in (("topk_select", (scores, 10, None)), ("batched_topk_select", (scores, [3, 4], None))):
        chosen, kernel = backends.resolve(name, "cpu", torch.float32)
        made = []
        monkeypatch.setitem(backends.BACKENDS[chosen].kernels(), name,
                            lambda *a, k=kernel: made.append(k(*a)) or made[-1])
        for call in (getattr(_ops, name), getattr(_ops, name).op):
            made.clear()
            thr, cut = call(*args)
            if call is getattr(_ops, name):  # the custom op hands out its own Python objects
                assert thr is made[0][0] and cut is made[0][1], name
            assert thr.data_ptr() == made[0][0].data_ptr() and cut.data_ptr() == made[0][1].data_ptr(), name
