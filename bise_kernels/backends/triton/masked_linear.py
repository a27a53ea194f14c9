"""Masked linear in Triton: GEMMs that apply the top-k keep rule to weight tiles in registers.

* forward ``y = x @ (W*M)^T + b`` and dgrad ``grad_x = grad_y @ (W*M)`` share one kernel
  ``C = A @ B`` whose B tile is read from the weight (transposed or not) and masked on the fly;
  structured scores (one per output unit) mask C's columns in the epilogue instead, and a tile
  whose units are all dead skips its K loop (bias only).
* wgrad ``G = grad_y^T @ x`` never leaves the registers: its epilogue writes ``G * M`` (only
  when the weight gradient is needed) and ``G * W * slope`` (the score gradient; for structured
  scores, per output unit: each column tile's sums in a row of their own, the rows summed after, in
  a fixed order). The bias gradient is summed on the way.
* the packed-mask forward ``x @ (W*keep)^T + b`` is the same kernel reading the bool keep mask
  as uint8 "scores" under the rule ``s > 0`` (thr = cut = 0): a weight costs its own bytes plus
  one, which is what the small-M (memory-bound) regime pays for; up to ``SMALL_M`` rows it runs
  with the small-M tiles (``_small_m_mm_kernel``). Its backward reads the same mask: dgrad is that
  kernel again (W not transposed), wgrad's epilogue masks by the mask's bytes (``PACKED``) and reads
  the scores only for the "sigmoid" slope.
W*M is never written to memory. Semantics: ``backends/reference.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _checks
from ..reference import as_rows
from ._common import (
    MIN_BLOCK_N, SMALL_M, SMALL_M_TILES, accumulation_dtype, check_backward_args, check_device, dot_options,
    grouped_tile, keep, matmul_tuning, score_grad_epilogue, size_bucket, sum_partials, tie_limit, tile_for_mode,
    unit_partials,
)

KERNELS = ("masked_linear_forward", "masked_linear_backward", "masked_linear_keep_forward",
           "masked_linear_keep_backward")


@triton.jit
def _masked_mm_body(
    a_ptr, w_ptr, s_ptr, bias_ptr, c_ptr, thr_ptr, cut_ptr,
    ROWS, COLS, LOOP, ROWS_BUCKET, COLS_BUCKET, LOOP_BUCKET, row_len,
    stride_am, stride_al, stride_wu, stride_wr, stride_su, stride_sr, stride_cm, stride_cn, stride_bias,
    UNIT_ON_COLS: tl.constexpr, STRUCTURED: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C (ROWS, COLS) = A (ROWS, LOOP) @ B, B = W_eff^T (UNIT_ON_COLS, forward) or W_eff (dgrad).

    The weight W (units, row_len) is addressed by (unit, red) strides; so are unstructured scores.
    The ``*_BUCKET`` sizes only pick the tile (``_common.matmul_tuning``).
    """
    pid_m, pid_n = grouped_tile(ROWS, COLS, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < ROWS
    n_ok = offs_n < COLS
    m64 = offs_m.to(tl.int64)  # addresses in int64: an operand may hold 2**31 elements or more
    n64 = offs_n.to(tl.int64)
    thr = tl.load(thr_ptr)
    cut = tl.load(cut_ptr)
    steps = tl.cdiv(LOOP, BLOCK_K)
    if UNIT_ON_COLS:
        if STRUCTURED:
            s_col = tl.load(s_ptr + n64 * stride_su, mask=n_ok, other=0)
            col_kept = keep(s_col, thr, offs_n, tl.minimum(cut, COLS)) & n_ok
            steps = tl.where(tl.max(col_kept.to(tl.int32), axis=0) > 0, steps, 0)  # dead tile: no K loop
        else:
            limit = tie_limit(cut, offs_n, row_len)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for step in range(0, steps):
        offs_l = step * BLOCK_K + tl.arange(0, BLOCK_K)
        l_ok = offs_l < LOOP
        l64 = offs_l.to(tl.int64)
        b_ok = l_ok[:, None] & n_ok[None, :]
        a = tl.load(a_ptr + m64[:, None] * stride_am + l64[None, :] * stride_al,
                    mask=m_ok[:, None] & l_ok[None, :], other=0)
        # pruned weights become b * 0, not 0: W * keep, as the reference (an inf pruned weight gives NaN)
        if UNIT_ON_COLS:  # B[l, n] = W[n, l]
            b = tl.load(w_ptr + n64[None, :] * stride_wu + l64[:, None] * stride_wr, mask=b_ok, other=0)
            if STRUCTURED:
                b = tl.where(col_kept[None, :], b, b * 0)
            else:
                s = tl.load(s_ptr + n64[None, :] * stride_su + l64[:, None] * stride_sr, mask=b_ok, other=0)
                b = tl.where(keep(s, thr, offs_l[:, None], limit[None, :]), b, b * 0)
        else:  # B[l, n] = W[l, n]
            b = tl.load(w_ptr + l64[:, None] * stride_wu + n64[None, :] * stride_wr, mask=b_ok, other=0)
            if STRUCTURED:
                s_row = tl.load(s_ptr + l64 * stride_su, mask=l_ok, other=0)
                b = tl.where(keep(s_row, thr, offs_l, tl.minimum(cut, LOOP))[:, None], b, b * 0)
            else:
                s = tl.load(s_ptr + l64[:, None] * stride_su + n64[None, :] * stride_sr, mask=b_ok, other=0)
                b = tl.where(keep(s, thr, offs_n[None, :], tie_limit(cut, offs_l, row_len)[:, None]), b, b * 0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n64 * stride_bias, mask=n_ok, other=0).to(ACC)[None, :]
    c = acc.to(c_ptr.dtype.element_ty)
    tl.store(c_ptr + m64[:, None] * stride_cm + n64[None, :] * stride_cn, c, mask=m_ok[:, None] & n_ok[None, :])


def _mm_staged(args: dict) -> tuple:
    """What the masked GEMM stages in shared memory each K step: A, the weight, unstructured scores."""
    return (args["a_ptr"], args["w_ptr"]) + (() if args["STRUCTURED"] else (args["s_ptr"],))


def _wgrad_staged(args: dict) -> tuple:
    """What wgrad stages each K step: grad_y and x (the scores are read in the epilogue only)."""
    return args["g_ptr"], args["x_ptr"]


_MM_KEY = ["ROWS_BUCKET", "COLS_BUCKET", "LOOP_BUCKET", "UNIT_ON_COLS", "STRUCTURED"]
_masked_mm_kernel = matmul_tuning(key=_MM_KEY, staged=_mm_staged)(_masked_mm_body)
_small_m_mm_kernel = matmul_tuning(key=_MM_KEY, staged=_mm_staged, tiles=SMALL_M_TILES)(_masked_mm_body)
"""The same GEMM with the small-M tiles: the packed-mask forward and dgrad for M <= SMALL_M (``_common``)."""


@matmul_tuning(key=["ROWS_BUCKET", "COLS_BUCKET", "LOOP_BUCKET", "STRUCTURED", "NEED_W", "NEED_S", "PACKED"],
               staged=_wgrad_staged, reset_to_zero=["gs_ptr"])
@triton.jit
def _masked_wgrad_kernel(
    g_ptr, x_ptr, w_ptr, s_ptr, k_ptr, thr_ptr, cut_ptr, gw_ptr, gs_ptr, gb_ptr,
    ROWS, COLS, LOOP, ROWS_BUCKET, COLS_BUCKET, LOOP_BUCKET, temperature,
    stride_gm, stride_gn, stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_kn, stride_kk,
    stride_gwn, stride_gwk, stride_gsn, stride_gsk,
    STRUCTURED: tl.constexpr, SIGMOID: tl.constexpr, NEED_W: tl.constexpr, NEED_S: tl.constexpr,
    NEED_B: tl.constexpr, PACKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    S_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """G (ROWS=N, COLS=K) = grad_y^T @ x over LOOP=M rows, consumed by the score-gradient epilogue
    (masked by the scores' rule, or ``PACKED`` by the keep mask ``k_ptr``). Structured: ``gs_ptr`` is a
    (column tiles, ROWS) :func:`._common.unit_partials` buffer; this tile writes row ``pid_n``."""
    pid_m, pid_n = grouped_tile(ROWS, COLS, BLOCK_M, BLOCK_N, GROUP_M)
    units = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    reds = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    unit_ok = units < ROWS
    red_ok = reds < COLS
    u64 = units.to(tl.int64)  # addresses in int64: an operand may hold 2**31 elements or more
    r64 = reds.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    bias_acc = tl.zeros((BLOCK_M,), dtype=ACC)
    for step in range(0, tl.cdiv(LOOP, BLOCK_K)):
        offs_l = step * BLOCK_K + tl.arange(0, BLOCK_K)
        l_ok = offs_l < LOOP
        l64 = offs_l.to(tl.int64)
        a = tl.load(g_ptr + u64[:, None] * stride_gn + l64[None, :] * stride_gm,
                    mask=unit_ok[:, None] & l_ok[None, :], other=0)
        b = tl.load(x_ptr + l64[:, None] * stride_xm + r64[None, :] * stride_xk,
                    mask=l_ok[:, None] & red_ok[None, :], other=0)
        if NEED_B:
            bias_acc += tl.sum(a.to(ACC), axis=1)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
    if NEED_B:
        tl.store(gb_ptr + u64, bias_acc.to(gb_ptr.dtype.element_ty), mask=unit_ok & (pid_n == 0))
    valid = unit_ok[:, None] & red_ok[None, :]
    if STRUCTURED:
        s_ptrs = s_ptr + u64 * stride_sn
        k_ptrs = k_ptr + u64 * stride_kn
        gs_ptrs = gs_ptr + pid_n.to(tl.int64) * ROWS + u64
    else:
        s_ptrs = s_ptr + u64[:, None] * stride_sn + r64[None, :] * stride_sk
        k_ptrs = k_ptr + u64[:, None] * stride_kn + r64[None, :] * stride_kk
        gs_ptrs = gs_ptr + u64[:, None] * stride_gsn + r64[None, :] * stride_gsk
    score_grad_epilogue(
        acc, units, reds, unit_ok, valid, COLS, ROWS,
        w_ptr + u64[:, None] * stride_wn + r64[None, :] * stride_wk, s_ptrs, k_ptrs,
        gw_ptr + u64[:, None] * stride_gwn + r64[None, :] * stride_gwk, gs_ptrs,
        tl.load(thr_ptr), tl.load(cut_ptr), temperature,
        STRUCTURED, SIGMOID, NEED_W, NEED_S, PACKED, S_ACC,
    )


def _buckets(*sizes: int) -> tuple[int, ...]:
    return tuple(size_bucket(n) for n in sizes)


def _mm_grid(rows: int, cols: int):
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)


def _masked_mm(a, weight, scores, structured, bias, thr, cut, unit_on_cols, kernel=_masked_mm_kernel):
    """``a @ W_eff^T + bias`` (unit_on_cols) or ``a @ W_eff``, for a 2-d ``a``."""
    rows, loop = a.shape
    units, row_len = weight.shape
    cols = units if unit_on_cols else row_len
    out = torch.empty((rows, cols), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if a.dtype == torch.float64 and scores.element_size() < 4:
        # Triton 3.6 sizes an fp64 tl.dot operand by the narrowest load it derives from, and fails to lower
        # one masked by 16-bit scores or mask bytes for sm_90 ("fp64 don't support largeK MMA"). As fp32
        # (exact) they keep the same entries.
        scores, thr = scores.float(), thr.float()
    s_strides = (scores.stride(0), 0) if structured else scores.stride()
    tile_for_mode(kernel)[_mm_grid(rows, cols)](
        a, weight, scores, weight if bias is None else bias, out, thr, cut,
        rows, cols, loop, *_buckets(rows, cols, loop), row_len,
        a.stride(0), a.stride(1), weight.stride(0), weight.stride(1), *s_strides, out.stride(0), out.stride(1),
        0 if bias is None else bias.stride(0),
        UNIT_ON_COLS=unit_on_cols, STRUCTURED=structured, HAS_BIAS=bias is not None,
        **dot_options(a.dtype),
    )
    return out


def _check_linear(x, weight, bias, scores, thr, cut) -> bool:
    structured = _checks.check_masked_linear(x, weight, bias, scores, thr, cut)
    check_device(x)
    return structured


def masked_linear_forward(x, weight, bias, scores, thr, cut):
    """``x @ (weight * M)^T + bias``, the mask applied to weight tiles in registers."""
    structured = _check_linear(x, weight, bias, scores, thr, cut)
    y = _masked_mm(as_rows(x), weight, scores, structured, bias, thr, cut, unit_on_cols=True)
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


def _keep_rule(device) -> tuple[torch.Tensor, torch.Tensor]:
    """(thr, cut) = (0, 0): the rule ``s > thr or (s == thr and i < cut)`` on a keep mask's bytes is ``keep > 0``."""
    return torch.zeros((), dtype=torch.uint8, device=device), torch.zeros((), dtype=torch.int64, device=device)


def _mm_kernel(rows: int, packed: bool):
    """The small-M tiles for the packed mask up to ``SMALL_M`` rows (forward: x's, dgrad: grad_y's)."""
    return _small_m_mm_kernel if packed and rows <= SMALL_M else _masked_mm_kernel


def masked_linear_keep_forward(x, weight, bias, keep):
    """``x @ (weight * keep)^T + bias``: the packed keep mask applied to weight tiles in registers."""
    structured = _checks.check_masked_linear_keep(x, weight, bias, keep)
    check_device(x)
    x2 = as_rows(x)
    y = _masked_mm(x2, weight, keep.view(torch.uint8), structured, bias, *_keep_rule(x.device), unit_on_cols=True,
                   kernel=_mm_kernel(x2.shape[0], packed=True))
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


def masked_linear_backward(grad_y, x, weight, scores, thr, cut, estimator, temperature, needs):
    """(grad_x, grad_weight, grad_bias, grad_scores), each None unless asked for in ``needs``."""
    structured = _check_linear(x, weight, None, scores, thr, cut)
    check_backward_args(grad_y, x.shape[:-1] + (weight.shape[0],), x, estimator, temperature, needs, 4)
    return _backward(grad_y, x, weight, scores, structured, estimator, temperature, needs, scores, thr, cut, False)


def masked_linear_keep_backward(grad_y, x, weight, scores, keep, estimator, temperature, needs):
    """The backward of :func:`masked_linear_keep_forward`: dgrad and the weight gradient read the
    packed mask; the scores are read only for the "sigmoid" slope (never for "ste")."""
    structured = _checks.check_masked_linear_keep(x, weight, None, keep, scores)
    check_device(x)
    check_backward_args(grad_y, x.shape[:-1] + (weight.shape[0],), x, estimator, temperature, needs, 4)
    return _backward(grad_y, x, weight, scores, structured, estimator, temperature, needs, keep.view(torch.uint8),
                     *_keep_rule(x.device), True)


def _backward(grad_y, x, weight, scores, structured, estimator, temperature, needs, mask, thr, cut, packed):
    """The backward both masked linears share. ``mask`` is what the GEMMs mask by under the rule
    (thr, cut): the scores, or (``packed``) the keep mask's bytes, which wgrad's epilogue then reads
    as the mask while the scores give only the slope."""
    need_x, need_w, need_b, need_s = (bool(n) for n in needs)
    n_out, k_in = weight.shape
    g2 = as_rows(grad_y)
    gx = gw = gb = gs = None
    if need_x:
        gx = _masked_mm(g2, weight, mask, structured, None, thr, cut, unit_on_cols=False,
                        kernel=_mm_kernel(g2.shape[0], packed)).reshape(x.shape)
    fuse_b = need_b and weight.numel() > 0
    if (need_w or need_s) and weight.numel() > 0:
        x2 = as_rows(x)
        gw = torch.empty_like(weight) if need_w else None
        if need_s:
            gs = unit_partials(triton.cdiv(k_in, MIN_BLOCK_N), n_out, scores, x) if structured else \
                torch.empty_like(scores)
        gb = torch.empty(n_out, dtype=x.dtype, device=x.device) if fuse_b else None
        dummy = torch.empty(1, dtype=torch.float32, device=x.device)  # for pointers a config never touches
        gs_strides = gs.stride() if need_s and not structured else (0, 0)
        s_strides = (scores.stride(0), 0) if structured else scores.stride()
        k_strides = (mask.stride(0), 0) if structured else mask.stride()
        tile_for_mode(_masked_wgrad_kernel)[_mm_grid(n_out, k_in)](
            g2, x2, weight, scores, mask, thr, cut, dummy if gw is None else gw, dummy if gs is None else gs,
            dummy if gb is None else gb,
            n_out, k_in, g2.shape[0], *_buckets(n_out, k_in, g2.shape[0]), float(temperature),
            g2.stride(0), g2.stride(1), x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
            *s_strides, *k_strides, *(gw.stride() if need_w else (0, 0)), *gs_strides,
            STRUCTURED=structured, SIGMOID=estimator == "sigmoid", NEED_W=need_w, NEED_S=need_s,
            NEED_B=fuse_b, PACKED=packed, S_ACC=accumulation_dtype(scores.dtype),
            **dot_options(x.dtype),
        )
        if need_s:
            gs = sum_partials(gs, scores) if structured else gs.to(scores.dtype)
    elif need_w or need_s:  # an empty weight (in_features == 0)
        gw = torch.empty_like(weight) if need_w else None
        gs = torch.zeros_like(scores) if need_s else None
    if need_b and gb is None:
        gb = g2.sum(0)
    return gx, gw, gb, gs
