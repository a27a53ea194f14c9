"""Helpers shared by the Triton masked-op kernels: the keep rule in registers, the score slope,
the fused score-gradient epilogue, GEMM tile selection and the Triton-specific argument checks.

The keep rule is the one of ``backends/reference.py``: entry ``i`` is kept iff
``s > thr or (s == thr and i < cut)``. Kernels never build ``i`` in int64 per element: for a
weight row ``u`` of length ``R`` the tie limit ``clamp(cut - u * R, 0, R)`` is computed once per
row, and the element at column ``r`` of that row is a kept tie iff ``r < limit``.

Argument checks are those of ``bise_kernels/_checks.py`` (one function per op); only what is
particular to Triton (the device it runs on) and to backward kernels (``grad_y``, ``needs``) is
checked here.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ... import _checks
from .. import INTERPRET

AUTOTUNE = os.environ.get("BISE_KERNELS_AUTOTUNE", "1") != "0" and not INTERPRET
"""Autotune the GEMM tiles (``BISE_KERNELS_AUTOTUNE=0``: one heuristic tile per shape bucket).

Autotuning compiles and times every tile of :data:`MATMUL_TILES` that fits, once per kernel,
shape bucket and dtype; the heuristic compiles one. The interpreter always takes the heuristic
(there is nothing to time)."""

# ----------------------------------------------------------------------------- device helpers


@triton.jit
def keep(s, thr, index, limit):
    """The keep rule: ``s > thr``, or a tie whose index (within its row) is below the row's limit.

    bf16 compares as fp32 (exact: every bf16 is an fp32): the interpreter compares bf16 by its bit
    patterns as integers, which orders negative values backwards; compiled, the cast is one shift.
    """
    if s.dtype == tl.bfloat16:
        s = s.to(tl.float32)
        thr = thr.to(tl.float32)
    return (s > thr) | ((s == thr) & (index < limit))


@triton.jit
def tie_limit(cut, units, row_len):
    """Per weight row ``u``: how many leading ties of that row are kept, ``clamp(cut - u*R, 0, R)``, computed in
    int64, returned in R's type: at most R, so it fits; int32 for the rows of real layers (the compare in a
    GEMM's inner loop stays 32-bit), int64 where R is 2**31 or more (Triton passes such an R as int64; a
    limit cut to int32 there wrapped and dropped the row's kept ties)."""
    lim = cut - units.to(tl.int64) * row_len
    like_r = units * 0 + row_len  # R's type as a tensor: an R of 1 is a constexpr (Triton specialises it), no dtype
    return tl.minimum(tl.maximum(lim, 0), row_len).to(like_r.dtype)


@triton.jit
def sigmoid_slope(s, temperature, S_ACC: tl.constexpr):
    """d gate / d score of the "sigmoid" estimator, sigmoid'(s/T)/T, in S_ACC (fp32 or fp64)."""
    sig = tl.sigmoid(s.to(S_ACC) / temperature)
    return sig * (1 - sig) / temperature


@triton.jit
def grouped_tile(ROWS, COLS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program, grouped along rows for L2 reuse."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(ROWS, BLOCK_M)
    num_n = tl.cdiv(COLS, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size
    pid_n = (pid % per_group) // size
    return pid_m, pid_n


@triton.jit
def score_grad_epilogue(
    g, units, reds, unit_ok, valid, row_len, num_units,
    w_ptrs, s_ptrs, k_ptrs, gw_ptrs, gs_ptrs, thr, cut, temperature,
    STRUCTURED: tl.constexpr, SIGMOID: tl.constexpr, NEED_W: tl.constexpr, NEED_S: tl.constexpr,
    PACKED: tl.constexpr, S_ACC: tl.constexpr,
):
    """From a tile ``g`` of dL/dW_eff (units x reds; fp32, fp64 for fp64 data): write ``g * keep``
    (weight gradient) and ``g * W * slope`` (score gradient) without a weight-sized intermediate.

    The mask is the keep rule on the scores ``s_ptrs``, or, ``PACKED``, the bytes of a packed keep
    mask ``k_ptrs`` (nonzero: kept); the scores are then read only for the "sigmoid" slope.
    Structured scores (one per unit): ``s_ptrs`` / ``k_ptrs`` are (units,), and the score gradient is
    summed over the tile's reds and stored in this program's row ``gs_ptrs`` (units,) of a
    :func:`unit_partials` buffer (fp32/fp64), whose rows the launcher sums.
    """
    if STRUCTURED:
        if SIGMOID or (NEED_W and not PACKED):
            s = tl.load(s_ptrs, mask=unit_ok, other=0)
        if NEED_W:
            if PACKED:
                kept = tl.load(k_ptrs, mask=unit_ok, other=0) != 0
            else:
                kept = keep(s, thr, units, tl.minimum(cut, num_units))
            gw = g.to(gw_ptrs.dtype.element_ty)  # cast first: a gradient that overflows the weight's dtype is inf * 0
            tl.store(gw_ptrs, tl.where(kept[:, None], gw, gw * 0), mask=valid)
        if NEED_S:
            part = tl.sum(g * tl.load(w_ptrs, mask=valid, other=0).to(g.dtype), axis=1)
            if SIGMOID:
                part = part * sigmoid_slope(s, temperature, S_ACC)
            tl.store(gs_ptrs, part.to(gs_ptrs.dtype.element_ty), mask=unit_ok)
    else:
        if SIGMOID or (NEED_W and not PACKED):
            s = tl.load(s_ptrs, mask=valid, other=0)
        if NEED_W:
            if PACKED:
                kept = tl.load(k_ptrs, mask=valid, other=0) != 0
            else:
                kept = keep(s, thr, reds[None, :], tie_limit(cut, units, row_len)[:, None])
            gw = g.to(gw_ptrs.dtype.element_ty)  # as above
            tl.store(gw_ptrs, tl.where(kept, gw, gw * 0), mask=valid)  # grad * keep
        if NEED_S:
            gs = g * tl.load(w_ptrs, mask=valid, other=0).to(g.dtype)
            if SIGMOID:
                gs = gs * sigmoid_slope(s, temperature, S_ACC)
            tl.store(gs_ptrs, gs.to(gs_ptrs.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- host helpers

MATMUL_TILES = (  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for 16-bit elements, largest first
    (128, 256, 64, 8, 3),  # compute-bound: M, N >= 256
    (128, 128, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (16, 64, 128, 4, 4),  # memory-bound small M: stream the weight
)


SMALL_M_TILES = (  # the packed-mask forward and dgrad at M <= SMALL_M: the weight and its mask streamed once
    (64, 64, 128, 4, 3),  # M 64-256: 4 row tiles share each weight tile through L2
    (32, 64, 128, 4, 4),
    (16, 32, 256, 4, 4),  # M <= 16: a 4096-row weight spreads over 128 programs, one per SM of an H100/H200
    (16, 64, 128, 4, 4),
)
SMALL_M = 256
"""Rows (M) up to which the packed-mask forward and dgrad take :data:`SMALL_M_TILES` (unmeasured on a GPU)."""


def size_bucket(n: int) -> int:
    """The autotune key of a GEMM size: the next power of two, at least 16."""
    return max(16, triton.next_power_of_2(int(n)))


def _config(tile: tuple[int, ...], element_size: int = 2) -> triton.Config:
    """A tile as a Config; BLOCK_K shrinks for 4/8-byte elements so the stages fit in shared memory.
    ``element_size``: the widest element a launch stages each K step (:func:`matmul_tuning`'s ``staged``)."""
    m, n, k, warps, stages = tile
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": max(16, k * 2 // element_size), "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


def matmul_configs(tiles: tuple = MATMUL_TILES) -> list[triton.Config]:
    """The autotune list, one per tile, for 16-bit elements (:func:`matmul_tuning` resizes BLOCK_K per
    launch)."""
    return [_config(tile) for tile in tiles]


def _fits(tile_m: int, tile_n: int, rows_bucket: int, cols_bucket: int) -> bool:
    return tile_m <= rows_bucket and tile_n <= cols_bucket


def prune_matmul_configs(configs, named_args, **kwargs):
    """Drop tiles larger than the shape bucket (``ROWS_BUCKET`` / ``COLS_BUCKET`` kernel arguments)."""
    kept = [c for c in configs
            if _fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], named_args["ROWS_BUCKET"], named_args["COLS_BUCKET"])]
    return kept or configs[-1:]


INTERPRET_BLOCK = 32
"""BLOCK_M = BLOCK_N = BLOCK_K of the one tile under the interpreter, where tile size only costs time."""

MIN_BLOCK_N = INTERPRET_BLOCK if INTERPRET else min(tile[1] for tile in MATMUL_TILES)
"""The narrowest BLOCK_N a GEMM of :data:`MATMUL_TILES` may run with: sizes a :func:`unit_partials`
buffer before the autotuner picks the tile."""


@functools.lru_cache(maxsize=None)
def heuristic_config(rows_bucket: int, cols_bucket: int, element_size: int,
                     tiles: tuple = MATMUL_TILES) -> triton.Config:
    """The one tile of a shape bucket without autotuning: the first of ``tiles`` that fits, BLOCK_K
    sized for the widest staged ``element_size`` (:data:`INTERPRET_BLOCK` cubed under the interpreter)."""
    if INTERPRET:
        block = INTERPRET_BLOCK
        return triton.Config({"BLOCK_M": block, "BLOCK_N": block, "BLOCK_K": block, "GROUP_M": 8}, num_warps=4,
                             num_stages=1)
    tile = next((t for t in tiles if _fits(t[0], t[1], rows_bucket, cols_bucket)), tiles[-1])
    return _config(tile, element_size)


def _staged_size(staged, args: dict) -> int:
    """Bytes of the widest element a launch stages in shared memory each K step."""
    return max(t.element_size() for t in staged(args))


def _heuristic(name: str, tiles: tuple, staged, args: dict):
    config = heuristic_config(args["ROWS_BUCKET"], args["COLS_BUCKET"], _staged_size(staged, args), tiles)
    return config.all_kwargs()[name]


def matmul_tuning(key: list[str], staged, reset_to_zero: list[str] | None = None, tiles: tuple = MATMUL_TILES):
    """Decorator of a GEMM kernel with ``ROWS_BUCKET`` / ``COLS_BUCKET`` / ``LOOP_BUCKET`` arguments
    (:func:`size_bucket` of its sizes): autotuned over :func:`matmul_configs` of ``tiles`` keyed on
    ``key``, or, without :data:`AUTOTUNE`, one :func:`heuristic_config` per bucket. The autotuned
    kernel carries the heuristic one as ``.deterministic`` (:func:`tile_for_mode`).

    ``staged(args)``: the tensors a launch stages in shared memory each K step (``args``: its arguments
    by name). BLOCK_K is sized for the widest of them, autotuned or not: sized for the operands alone,
    bf16 x with fp32 scores would need 278,528 B at 128x256x64, over the 232,448 B of an sm_90 block."""
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")
    heuristic = triton.heuristics({name: functools.partial(_heuristic, name, tiles, staged) for name in names})
    if not AUTOTUNE:
        return heuristic

    def prune(configs, named_args, **kwargs):  # the configs' BLOCK_K is the tile's (2-byte elements)
        size = _staged_size(staged, {**named_args, **kwargs})
        return [_config((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages),
                        size) for c in prune_matmul_configs(configs, named_args)]

    def decorate(fn):
        tuned = triton.autotune(configs=matmul_configs(tiles), key=key, reset_to_zero=reset_to_zero,
                                prune_configs_by={"early_config_prune": prune})(fn)
        tuned.deterministic = heuristic(fn)
        return tuned

    return decorate


def tile_for_mode(kernel):
    """The GEMM ``kernel`` to launch now: under torch.use_deterministic_algorithms(True) its heuristic
    twin (:func:`matmul_tuning`). The autotuner keeps the tile that timed fastest in this process,
    which another run may not pick, and the tile (BLOCK_K, the K loop's order of fp sums) sets the
    result's bits; the heuristic tile is the same in every run (as torch's cudnn.benchmark = False)."""
    if torch.are_deterministic_algorithms_enabled():
        return getattr(kernel, "deterministic", kernel)
    return kernel


def dot_options(dtype: torch.dtype) -> dict:
    """Constexprs of the GEMM kernels for an operand dtype.

    ``ACC``: fp32 accumulation (fp64 for fp64 operands). ``PRECISION``: fp32 operands use tf32
    only where torch itself would; "ieee" for fp64; 16-bit operands keep Triton's default (tensor
    cores). ``UPCAST``: the interpreter's bf16 ``tl.dot`` is silently wrong, so its operands go
    to fp32 there.
    """
    exact = dtype == torch.float64 or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    return {
        "UPCAST": INTERPRET and dtype == torch.bfloat16,
        "PRECISION": "ieee" if exact else "tf32",
        "ACC": accumulation_dtype(dtype),
    }


def accumulation_dtype(dtype: torch.dtype) -> tl.dtype:
    """The accumulation dtype of backends/reference.py as a Triton type: fp32, fp64 for fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def unit_partials(rows: int, units: int, scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Zeroed (rows, units) partial sums of a per-unit score gradient (fp32, fp64 if either is fp64):
    each program stores its sums in its own row and :func:`sum_partials` adds the rows up, in an
    order fixed by the shape. Float atomics would add them in the order the GPU schedules the
    programs, different bits from run to run (docs/ops.md, "Determinism")."""
    dtype = torch.float64 if torch.float64 in (x.dtype, scores.dtype) else torch.float32
    return torch.zeros((rows, units), dtype=dtype, device=scores.device)


def sum_partials(partials: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The score gradient from :func:`unit_partials` rows: their sum per unit (a torch reduction,
    deterministic), in the scores' dtype and shape."""
    return partials.reshape(-1, scores.numel()).sum(0).to(scores.dtype).reshape(scores.shape)


def check_device(x: torch.Tensor) -> None:
    """The device this backend runs on: cuda (cpu only under the interpreter). The op's check in
    ``_checks`` has already put every other argument on x's device."""
    if not (x.device.type == "cuda" or (INTERPRET and x.device.type == "cpu")):
        raise ValueError(f"the triton backend runs on cuda tensors (cpu only with TRITON_INTERPRET=1), "
                         f"got x on {x.device}")


def check_backward_args(grad_y: torch.Tensor, expected_shape, x: torch.Tensor, estimator, temperature,
                        needs, n_needs: int) -> None:
    """What a backward kernel takes beyond the forward's arguments."""
    _checks.check_tensor(grad_y, "grad_y")
    _checks.check_like(grad_y, x, "grad_y", "x")
    if tuple(grad_y.shape) != tuple(expected_shape):
        raise ValueError(f"grad_y must have shape {tuple(expected_shape)}, got {tuple(grad_y.shape)}")
    _checks.check_estimator(estimator, temperature)
    if len(needs) != n_needs:
        raise ValueError(f"needs must have {n_needs} booleans, got {list(needs)!r}")
