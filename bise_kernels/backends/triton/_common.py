"""Helpers shared by the Triton masked-op kernels: the keep rule in registers, the score slope,
the fused score-gradient epilogue, autotune configs and argument validation.

The keep rule is the one of ``backends/reference.py``: entry ``i`` is kept iff
``s > thr or (s == thr and i < cut)``. Kernels never build ``i`` in int64 per element: for a
weight row ``u`` of length ``R`` the tie limit ``clamp(cut - u * R, 0, R)`` is computed once per
row, and the element at column ``r`` of that row is a kept tie iff ``r < limit``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ... import _checks
from .. import reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Kernels run on CPU tensors through the Triton interpreter (tests); some work-arounds apply."""

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# ----------------------------------------------------------------------------- device helpers


@triton.jit
def keep(s, thr, index, limit):
    """The keep rule: ``s > thr``, or a tie whose index (within its row) is below the row's limit."""
    return (s > thr) | ((s == thr) & (index < limit))


@triton.jit
def tie_limit(cut, units, row_len):
    """Per weight row ``u``: how many leading ties of that row are kept, ``clamp(cut - u*R, 0, R)``."""
    lim = cut - units.to(tl.int64) * row_len
    return tl.minimum(tl.maximum(lim, 0), row_len).to(tl.int32)


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
    w_ptrs, s_ptrs, gw_ptrs, gs_ptrs, thr, cut, temperature,
    STRUCTURED: tl.constexpr, SIGMOID: tl.constexpr, NEED_W: tl.constexpr, NEED_S: tl.constexpr,
    S_ACC: tl.constexpr,
):
    """From a tile ``g`` of dL/dW_eff (units x reds; fp32, fp64 for fp64 data): write ``g * keep``
    (weight gradient) and ``g * W * slope`` (score gradient) without a weight-sized intermediate.

    Structured scores (one per unit): ``s_ptrs`` is (units,), and the score gradient is summed
    over the tile's reds and added atomically into the fp32/fp64 buffer ``gs_ptrs`` (units,).
    """
    if STRUCTURED:
        if NEED_W or SIGMOID:
            s = tl.load(s_ptrs, mask=unit_ok, other=0)
        if NEED_W:
            kept = keep(s, thr, units, tl.minimum(cut, num_units))
            tl.store(gw_ptrs, tl.where(kept[:, None], g, 0.0).to(gw_ptrs.dtype.element_ty), mask=valid)
        if NEED_S:
            part = tl.sum(g * tl.load(w_ptrs, mask=valid, other=0).to(g.dtype), axis=1)
            if SIGMOID:
                part = part * sigmoid_slope(s, temperature, S_ACC)
            tl.atomic_add(gs_ptrs, part.to(gs_ptrs.dtype.element_ty), mask=unit_ok)
    else:
        if NEED_W or SIGMOID:
            s = tl.load(s_ptrs, mask=valid, other=0)
        if NEED_W:
            kept = keep(s, thr, reds[None, :], tie_limit(cut, units, row_len)[:, None])
            tl.store(gw_ptrs, tl.where(kept, g, 0.0).to(gw_ptrs.dtype.element_ty), mask=valid)
        if NEED_S:
            gs = g * tl.load(w_ptrs, mask=valid, other=0).to(g.dtype)
            if SIGMOID:
                gs = gs * sigmoid_slope(s, temperature, S_ACC)
            tl.store(gs_ptrs, gs.to(gs_ptrs.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------- host helpers


def matmul_configs() -> list[triton.Config]:
    """Hopper GEMM tiles (large for compute-bound, BLOCK_M=16/32 for the memory-bound small-M
    regime); one config under the interpreter (more would need a GPU benchmarker)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8})]
    tiles = [
        (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
        (64, 64, 128, 4, 4), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4), (16, 128, 128, 4, 3),
        (16, 32, 256, 4, 4), (32, 32, 256, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in tiles]


def prune_matmul_configs(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem (``ROWS``/``COLS``/``LOOP`` kernel arguments)."""
    def fits(block, size):
        return block <= max(16, triton.next_power_of_2(int(size)))

    kept = [c for c in configs
            if fits(c.kwargs["BLOCK_M"], named_args["ROWS"]) and fits(c.kwargs["BLOCK_N"], named_args["COLS"])]
    return kept or configs[-1:]


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
    """The reference's accumulation dtype as a Triton type: fp32, fp64 for fp64."""
    return tl.float64 if reference.accumulation_dtype(dtype) == torch.float64 else tl.float32


def score_grad_buffer(scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Zeroed per-unit accumulator for structured score gradients (fp32, fp64 if either is fp64)."""
    dtype = torch.promote_types(reference.accumulation_dtype(x.dtype), reference.accumulation_dtype(scores.dtype))
    return torch.zeros(scores.shape, dtype=dtype, device=scores.device)


def check_device(tensors: dict[str, torch.Tensor]) -> torch.device:
    """All on one device, and one this backend runs on (cuda; cpu only under the interpreter)."""
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {t0.device}; all must share a device")
    if not (t0.device.type == "cuda" or (INTERPRET and t0.device.type == "cpu")):
        raise ValueError(f"the triton backend runs on cuda tensors (cpu only with TRITON_INTERPRET=1), "
                         f"got {name0} on {t0.device}")
    return t0.device


def check_dtype(x: torch.Tensor) -> None:
    _checks.check_tensor(x, "x")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be one of {FLOAT_DTYPES} for the triton backend, got {x.dtype}")


def check_selection(scores: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor) -> None:
    """``thr``: one value in the scores' dtype; ``cut``: one int64 (both stay on the device)."""
    _checks.check_tensor(scores, "scores")
    if not isinstance(thr, torch.Tensor) or thr.numel() != 1 or thr.dtype != scores.dtype:
        raise TypeError(f"thr must be a one-element tensor of the scores' dtype {scores.dtype}, got "
                        f"{thr.dtype if isinstance(thr, torch.Tensor) else type(thr).__name__} "
                        f"of shape {tuple(getattr(thr, 'shape', ()))}")
    if not isinstance(cut, torch.Tensor) or cut.numel() != 1 or cut.dtype != torch.int64:
        raise TypeError(f"cut must be a one-element int64 tensor, got "
                        f"{cut.dtype if isinstance(cut, torch.Tensor) else type(cut).__name__}")


def check_layer(x: torch.Tensor, weight: torch.Tensor, bias, scores: torch.Tensor, thr, cut) -> bool:
    """Shared checks of the masked layers; returns whether the scores are structured."""
    check_dtype(x)
    _checks.check_tensor(weight, "weight")
    _checks.check_like(weight, x, "weight", "x")
    check_selection(scores, thr, cut)
    if scores.shape != weight.shape and tuple(scores.shape) != (weight.shape[0],):
        raise ValueError(f"scores must have weight's shape {tuple(weight.shape)} or ({weight.shape[0]},), "
                         f"got {tuple(scores.shape)}")
    if bias is not None:
        _checks.check_tensor(bias, "bias")
        _checks.check_like(bias, x, "bias", "x")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    named = {"x": x, "weight": weight, "scores": scores, "thr": thr, "cut": cut}
    if bias is not None:
        named["bias"] = bias
    check_device(named)
    return scores.shape != weight.shape


def check_backward_args(grad_y: torch.Tensor, expected_shape, x: torch.Tensor, estimator, temperature,
                        needs, n_needs: int) -> None:
    _checks.check_tensor(grad_y, "grad_y")
    _checks.check_like(grad_y, x, "grad_y", "x")
    if tuple(grad_y.shape) != tuple(expected_shape):
        raise ValueError(f"grad_y must have shape {tuple(expected_shape)}, got {tuple(grad_y.shape)}")
    _checks.check_estimator(estimator, temperature)
    if len(needs) != n_needs:
        raise ValueError(f"needs must have {n_needs} booleans, got {list(needs)!r}")
