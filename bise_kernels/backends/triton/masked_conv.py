"""Masked conv2d: one fused Triton pass builds W*M, torch's convolution (cuDNN on GPU) does the rest.

Triton convs trail cuDNN, so the dense part stays with cuDNN: forward ``conv2d(x, W*M)``, and
one ``convolution_backward`` call for dgrad (on W*M), wgrad and the bias gradient. W*M is transient (never saved for backward). The wgrad result
feeds a fused epilogue kernel that writes ``grad_W_eff * M`` (only if needed) and the score
gradient ``grad_W_eff * W * slope`` (for structured scores summed per output channel: each
program's sums in a row of their own, the rows summed after, in a fixed order) in one pass.
Weights are addressed through their 4-d strides, so channels_last weights work in place; addresses
are int64 (a weight may hold 2**31 elements or more, a strided view reach that far). The grid is
1-d: a weight row of over 16,776,960 elements would take more than the 65,535 programs a grid's y
axis allows. Indices within a row (``C/groups * kH * kW`` elements) are int32: a longer row is
refused (:func:`_check_row`).
Semantics: ``backends/reference.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ... import _checks
from .. import INTERPRET
from ._common import (
    accumulation_dtype, check_backward_args, check_device, keep, score_grad_epilogue, sum_partials, tie_limit,
    unit_partials,
)

KERNELS = ("masked_conv2d_forward", "masked_conv2d_backward")

BLOCK_UNITS, BLOCK_REDS = (16, 64) if INTERPRET else (8, 256)


@triton.jit
def _tile(UNITS, BLOCK_U: tl.constexpr, BLOCK_R: tl.constexpr):
    """(units, reds, reduction tile) of this program's tile. Units vary fastest along the 1-d grid, as
    they did along the x axis of a 2-d one: the same programs run in the same order."""
    pid = tl.program_id(0)
    unit_tiles = tl.cdiv(UNITS, BLOCK_U)
    pid_r = pid // unit_tiles
    pid_u = pid - pid_r * unit_tiles
    return pid_u * BLOCK_U + tl.arange(0, BLOCK_U), pid_r * BLOCK_R + tl.arange(0, BLOCK_R), pid_r


@triton.jit
def _red_offsets(reds, KHW, KW, stride_c, stride_h, stride_w):
    """Memory offsets (int64) of flat in-channel/kernel indices r = (c * KH + h) * KW + w.

    The divisions stay in int32 (an index within a row); each index is widened before its stride
    multiplies it."""
    c = reds // KHW
    rem = reds - c * KHW
    h = rem // KW
    w = rem - h * KW
    return c.to(tl.int64) * stride_c + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w


@triton.jit
def _mask_weight_kernel(
    w_ptr, s_ptr, out_ptr, thr_ptr, cut_ptr, UNITS, R, KHW, KW,
    sw0, sw1, sw2, sw3, ss0, ss1, ss2, ss3, so0, so1, so2, so3,
    STRUCTURED: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out = W * keep(scores), tiles of (output channels, c*kh*kw)."""
    units, reds, _ = _tile(UNITS, BLOCK_U, BLOCK_R)
    unit_ok = units < UNITS
    valid = unit_ok[:, None] & (reds < R)[None, :]
    u64 = units.to(tl.int64)  # addresses in int64: in int32, unit * stride wraps past 2**31 elements
    thr = tl.load(thr_ptr)
    cut = tl.load(cut_ptr)
    w = tl.load(w_ptr + u64[:, None] * sw0 + _red_offsets(reds, KHW, KW, sw1, sw2, sw3)[None, :], mask=valid)
    if STRUCTURED:
        s = tl.load(s_ptr + u64 * ss0, mask=unit_ok, other=0)
        kept = keep(s, thr, units, tl.minimum(cut, UNITS))[:, None]
    else:
        s = tl.load(s_ptr + u64[:, None] * ss0 + _red_offsets(reds, KHW, KW, ss1, ss2, ss3)[None, :],
                    mask=valid, other=0)
        kept = keep(s, thr, reds[None, :], tie_limit(cut, units, R)[:, None])
    tl.store(out_ptr + u64[:, None] * so0 + _red_offsets(reds, KHW, KW, so1, so2, so3)[None, :],
             tl.where(kept, w, w * 0), mask=valid)  # W * keep, as the reference: an inf pruned weight gives NaN


@triton.jit
def _conv_score_grad_kernel(
    g_ptr, w_ptr, s_ptr, gw_ptr, gs_ptr, thr_ptr, cut_ptr, UNITS, R, KHW, KW, temperature,
    sg0, sg1, sg2, sg3, sw0, sw1, sw2, sw3, ss0, ss1, ss2, ss3, sgw0, sgw1, sgw2, sgw3,
    sgs0, sgs1, sgs2, sgs3,
    STRUCTURED: tl.constexpr, SIGMOID: tl.constexpr, NEED_W: tl.constexpr, NEED_S: tl.constexpr,
    ACC: tl.constexpr, S_ACC: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Weight and score gradients from grad_W_eff in one read (epilogue of ``_common``). Structured:
    ``gs_ptr`` is a (reduction tiles, UNITS) ``unit_partials`` buffer; this program writes its tile's
    row."""
    units, reds, pid_r = _tile(UNITS, BLOCK_U, BLOCK_R)
    unit_ok = units < UNITS
    valid = unit_ok[:, None] & (reds < R)[None, :]
    u64 = units.to(tl.int64)  # addresses in int64: in int32, unit * stride wraps past 2**31 elements
    g = tl.load(g_ptr + u64[:, None] * sg0 + _red_offsets(reds, KHW, KW, sg1, sg2, sg3)[None, :],
                mask=valid, other=0).to(ACC)
    if STRUCTURED:
        s_ptrs = s_ptr + u64 * ss0
        gs_ptrs = gs_ptr + pid_r.to(tl.int64) * UNITS + u64
    else:
        s_ptrs = s_ptr + u64[:, None] * ss0 + _red_offsets(reds, KHW, KW, ss1, ss2, ss3)[None, :]
        gs_ptrs = gs_ptr + u64[:, None] * sgs0 + _red_offsets(reds, KHW, KW, sgs1, sgs2, sgs3)[None, :]
    score_grad_epilogue(
        g, units, reds, unit_ok, valid, R, UNITS,
        w_ptr + u64[:, None] * sw0 + _red_offsets(reds, KHW, KW, sw1, sw2, sw3)[None, :], s_ptrs, s_ptrs,
        gw_ptr + u64[:, None] * sgw0 + _red_offsets(reds, KHW, KW, sgw1, sgw2, sgw3)[None, :], gs_ptrs,
        tl.load(thr_ptr), tl.load(cut_ptr), temperature,
        STRUCTURED, SIGMOID, NEED_W, NEED_S, False, S_ACC,
    )


def _tiles(weight: torch.Tensor) -> tuple[int, int]:
    """(tiles along the output channels, tiles along a row c*kh*kw) of the fused passes."""
    return triton.cdiv(weight.shape[0], BLOCK_UNITS), triton.cdiv(weight[0].numel(), BLOCK_REDS)


def _grid(weight: torch.Tensor) -> tuple[int]:
    """One program per tile, on the grid's x axis (up to 2**31 - 1; y and z stop at 65,535)."""
    unit_tiles, red_tiles = _tiles(weight)
    return (unit_tiles * red_tiles,)


def _check_row(weight: torch.Tensor) -> None:
    """A weight row (``C/groups * kH * kW`` elements) the kernels' int32 row indices reach, else a named error."""
    row = math.prod(weight.shape[1:])
    if row >= 2**31:
        raise ValueError(f"weight of shape {tuple(weight.shape)}: a row of {row} elements (in_channels/groups * kH * "
                         "kW) is past the Triton masked conv's int32 row indices (at most 2**31 - 1): use another "
                         "backend")


def _geometry(weight: torch.Tensor) -> tuple[int, int, int, int]:
    units, _, kh, kw = weight.shape
    return units, weight[0].numel(), kh * kw, kw


def _strides(t: torch.Tensor, structured: bool = False) -> tuple[int, ...]:
    return (t.stride(0), 0, 0, 0) if structured else t.stride()


def masked_weight(weight: torch.Tensor, scores: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """W * keep(scores) in one pass, in the weight's memory format (a transient for cuDNN)."""
    _check_row(weight)
    structured = scores.shape != weight.shape
    out = torch.empty_like(weight)
    if weight.numel():
        _mask_weight_kernel[_grid(weight)](
            weight, scores, out, thr, cut, *_geometry(weight),
            *_strides(weight), *_strides(scores, structured), *_strides(out),
            STRUCTURED=structured, BLOCK_U=BLOCK_UNITS, BLOCK_R=BLOCK_REDS,
        )
    return out


def _check_conv(x, weight, bias, scores, thr, cut, stride, padding, dilation, groups):
    """(structured, stride, padding, dilation) as int pairs, from the op's one check."""
    checked = _checks.check_masked_conv2d(x, weight, bias, scores, thr, cut, stride, padding, dilation, groups)
    check_device(x)
    _check_row(weight)
    return checked


def masked_conv2d_forward(x, weight, bias, scores, thr, cut, stride, padding, dilation, groups):
    """``conv2d(x, W * M, bias)`` with W * M built by one fused Triton pass."""
    _, stride, padding, dilation = _check_conv(x, weight, bias, scores, thr, cut, stride, padding, dilation, groups)
    return F.conv2d(x, masked_weight(weight, scores, thr, cut), bias, stride, padding, dilation, groups)


def masked_conv2d_backward(
    grad_y, x, weight, scores, thr, cut, stride, padding, dilation, groups, estimator, temperature, needs
):
    """(grad_x, grad_weight, grad_bias, grad_scores), each None unless asked for in ``needs``."""
    structured, stride, padding, dilation = _check_conv(x, weight, None, scores, thr, cut, stride, padding, dilation,
                                                        groups)
    check_backward_args(grad_y, _checks.conv2d_output_shape(x.shape, weight.shape, stride, padding, dilation), x,
                        estimator, temperature, needs, 4)
    need_x, need_w, need_b, need_s = (bool(n) for n in needs)
    w_for_dgrad = masked_weight(weight, scores, thr, cut) if need_x else weight
    gx, grad_w_eff, gb = torch.ops.aten.convolution_backward(
        grad_y, x, w_for_dgrad, [weight.shape[0]] if need_b else None, list(stride), list(padding),
        list(dilation), False, [0, 0], groups, [need_x, need_w or need_s, need_b],
    )
    gw = gs = None
    if need_w or need_s:
        gw = torch.empty_like(weight) if need_w else None
        if need_s:
            gs = unit_partials(_tiles(weight)[1], weight.shape[0], scores, x) if structured else \
                torch.empty_like(scores)
        dummy = torch.empty(1, dtype=torch.float32, device=x.device)  # for pointers this launch never touches
        if weight.numel():
            _conv_score_grad_kernel[_grid(weight)](
                grad_w_eff, weight, scores, dummy if gw is None else gw, dummy if gs is None else gs, thr, cut,
                *_geometry(weight), float(temperature),
                *_strides(grad_w_eff), *_strides(weight), *_strides(scores, structured),
                *(_strides(gw) if need_w else (0,) * 4), *(_strides(gs, structured) if need_s else (0,) * 4),
                STRUCTURED=structured, SIGMOID=estimator == "sigmoid", NEED_W=need_w, NEED_S=need_s,
                ACC=accumulation_dtype(x.dtype), S_ACC=accumulation_dtype(scores.dtype),
                BLOCK_U=BLOCK_UNITS, BLOCK_R=BLOCK_REDS,
            )
        if gs is not None:
            gs = sum_partials(gs, scores) if structured else gs.to(scores.dtype)
    return (gx if need_x else None), gw, (gb if need_b else None), gs
