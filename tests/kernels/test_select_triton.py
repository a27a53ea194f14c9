"""What only the Triton radix select (backend "triton") has, against the reference, bit for bit:
the candidate buffer's capacity, tie cuts from chunk counts, the chunk plans, the sm_90 compile.

Under TRITON_INTERPRET=1 a chunk is 128 elements and the buffer 16 entries, so the small case set
(test_select_kernels.py) already runs every path. With a GPU the checks here run compiled twice:
with the shipped geometry and with the interpreter's tiny one, and the small case set runs in the
tiny geometry too, so that small inputs also reach the paths where programs of one problem race
(several chunks per problem, a buffer that fills while a launch runs); plus sizes only a GPU affords.
"""

import pytest
import torch

from _select_cases import (CASE_DTYPE, SMALL_CASES, assert_same_selection, check_adversarial, check_batched,
                           check_hints, check_list, skip_unless_supported)
from bise_kernels.backends import INTERPRET, kernel_table
from bise_kernels.backends import reference as ref

ON_GPU = torch.cuda.is_available() and not INTERPRET
pytestmark = pytest.mark.skipif(not (ON_GPU or INTERPRET), reason="Triton needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if ON_GPU else "cpu"


TINY = dict(BLOCK=64, ITERS=2, CHUNK_BLOCK=8, CAPACITY=16)  # the interpreter's geometry


@pytest.fixture(params=["shipped", "tiny"] if ON_GPU else ["shipped"])
def kernels(request, monkeypatch):
    from bise_kernels.backends.triton import select

    if request.param == "tiny":
        for name, value in TINY.items():
            monkeypatch.setattr(select, name, value)
    return kernel_table("triton")


@pytest.mark.skipif(not ON_GPU, reason="under the interpreter test_select_kernels.py runs these in this geometry")
@pytest.mark.parametrize("case", list(SMALL_CASES))
def test_small_case_set_in_the_tiny_geometry_on_gpu(monkeypatch, case):
    from bise_kernels.backends.triton import select

    for name, value in TINY.items():
        monkeypatch.setattr(select, name, value)
    skip_unless_supported("triton", CASE_DTYPE.get(case, torch.float32))
    SMALL_CASES[case](kernel_table("triton"), DEVICE)


@pytest.mark.parametrize("capacity", [1, 256])
def test_candidate_buffer_size_never_changes_the_result(kernels, monkeypatch, capacity):
    """Capacity 1 overflows on nearly every input (full-read passes, tie cut from chunk counts);
    256 holds every candidate after the first pass (later passes and the tie cut read the buffer)."""
    from bise_kernels.backends.triton import select

    monkeypatch.setattr(select, "CAPACITY", capacity)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(300, generator=g)
    check_list(kernels, DEVICE, [x, torch.randint(0, 3, (40,), generator=g).float()], (1, 170))
    check_hints(kernels, DEVICE, x, 120)


def test_tie_cut_over_many_chunks(kernels):
    """All-equal scores overflow the buffer: the cut comes from per-chunk tie counts."""
    x = torch.zeros(1100)
    x[::7] = -0.0
    check_list(kernels, DEVICE, [x], (700,))


@pytest.mark.parametrize("extra", [0, 1])
def test_buffer_filled_by_several_programs_up_to_and_past_capacity(kernels, extra):
    """The hint pass appends from every chunk at once: exactly CAPACITY candidates keep the
    buffer (tie cut from it), one more overflows it mid-launch (tie cut from chunk counts)."""
    from bise_kernels.backends.triton import select

    chunk, capacity = select.BLOCK * select.ITERS, select.CAPACITY
    n = chunk * 4
    x = torch.arange(n, dtype=torch.float32) + 10  # distinct, all above the ties
    ties = torch.linspace(0, n - 1, capacity + extra).round().long()  # spread over every chunk
    x[ties] = 1.0
    k = n - capacity - extra + 3  # the 3rd tie of capacity + extra
    check_list(kernels, DEVICE, [x], (k,), hint=torch.tensor(1.0))
    check_list(kernels, DEVICE, [x], (k,))


def test_a_program_that_fills_the_buffer_exactly_still_counts_its_later_candidates(kernels):
    """One chunk: the hint pass appends CAPACITY ties in the chunk's first loop step (the buffer exactly
    full) and more in its second. Those must still reach the counter (it then exceeds CAPACITY: the tie
    cut comes from chunk counts); a program that stopped appending at exactly full left a counter of
    CAPACITY, a buffer taken as complete, and a cut past its ties."""
    from bise_kernels.backends.triton import select

    block, capacity = select.BLOCK, select.CAPACITY
    n = block * select.ITERS
    x = torch.arange(n, dtype=torch.float32) + 10  # distinct, all above the ties
    x[:capacity] = 1.0  # exactly CAPACITY ties in the first loop step
    x[block:block + 4] = 1.0  # 4 more in the second
    ties = capacity + 4
    for nth in (capacity, capacity + 2, ties):  # the needed tie among the first ones, then among the later ones
        check_list(kernels, DEVICE, [x], (n - ties + nth,), hint=torch.tensor(1.0))


def test_plans_follow_the_chunk_geometry(kernels, monkeypatch):
    """A chunk table cached for one chunk size is never reused for another."""
    from bise_kernels.backends.triton import select

    x = torch.randn(3 * select.BLOCK * select.ITERS, generator=torch.Generator().manual_seed(10))
    on_device = x.to(DEVICE)
    for iters in (select.ITERS, 1):
        monkeypatch.setattr(select, "ITERS", iters)
        got = kernels["topk_select"]([on_device], 7, None)
        assert_same_selection(got, ref.topk_select([x], 7), iters)


@pytest.mark.skipif(not ON_GPU, reason="large sizes need a GPU")
def test_large_inputs_on_gpu():
    from bise_kernels.backends.triton import select

    kernels = kernel_table("triton")
    g = torch.Generator().manual_seed(8)
    for dtype in select.DTYPES:
        check_adversarial(kernels, DEVICE, 1_000_003, dtype, (1, 500_000, 1_000_003))
    layers = [torch.randn(n, generator=g) for n in (9408, 36864, 2359296, 64, 1000 * 2048)]
    check_batched(kernels, DEVICE, layers, [max(1, t.numel() // 3) for t in layers])
    check_list(kernels, DEVICE, layers, (1, 1_000_000))
    check_hints(kernels, DEVICE, torch.randn(3_000_000, generator=g), 1_500_000)


_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bise_kernels.backends.triton import select as T

def build(fn, types, consts, num_warps=T.NUM_WARPS):
    sig = dict(types, **{name: "constexpr" for name in consts})
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": num_warps})

p = dict(table_ptr="*i64", C="i64", chunk_ptr="*i64")
for geo in (dict(BLOCK=T.BLOCK, ITERS=T.ITERS, CAPACITY=T.CAPACITY, CHUNK_BLOCK=T.CHUNK_BLOCK), TINY):
    for bits, spec, level in ((32, True, 0), (32, False, 1), (16, False, 1)):
        his, shifts = T._levels(bits)
        build(T._digit_pass_kernel,
              dict(p, hint_ptr=f"*i{bits}", level_ptr="*i32", pref_ptr="*i32", krem_ptr="*i64", cnt_ptr="*i32",
                   bufl_ptr="*i32", hist_ptr="*i32", ticket_ptr="*i32", thr_ptr="*i32", buf_key_ptr="*i32",
                   buf_idx_ptr="*i64"),
              dict(KEY_BITS=bits, NLEV=len(his), LEVEL=level, SPEC=spec, HIS=his, SHIFTS=shifts, NB=T.NB,
                   BLOCK=geo["BLOCK"], ITERS=geo["ITERS"], CAPACITY=geo["CAPACITY"]))
    build(T._tie_kernel,
          dict(p, pref_ptr="*i32", krem_ptr="*i64", cnt_ptr="*i32", ticket_ptr="*i32", tie_cnt_ptr="*i32",
               cut_ptr="*i64", buf_key_ptr="*i32", buf_idx_ptr="*i64"),
          dict(KEY_BITS=32, NLEV=3, **geo))
for bits in (32, 16):
    build(T._keep_mask_kernel, dict(bits_ptr=f"*i{bits}", thr_ptr=f"*i{bits}", cut_ptr="*i64", out_ptr="*i1",
                                    n="i32", offset="i64"), dict(KEY_BITS=bits, BLOCK=T.BLOCK), num_warps=4)
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter skips Triton's compiler: compile the GPU sizes to a sm_90 cubin (no driver needed)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", f"TINY = {TINY!r}" + _COMPILE_FOR_SM90], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("kernel", ["topk_select", "batched_topk_select", "keep_mask"])
def test_auto_never_picks_the_triton_select_on_cuda(kernel):
    """Measured slower than torch.sort on an H200; it stays selectable by name."""
    from bise_kernels import backends

    with backends.use_backend("auto"):
        assert backends.resolve(kernel, "cuda")[0] != "triton"
    with backends.use_backend("triton"):
        assert backends.resolve(kernel, "cuda")[0] == "triton"
