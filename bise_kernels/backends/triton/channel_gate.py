"""Channel gate in Triton: ``y = x * g`` and its backward in one pass over the activations.

The input is seen, through the permutation that makes it contiguous (NCHW, channels_last, any
dense layout), as (outer, C, inner). Kernels walk 2-d tiles of a "channel axis" and a "reduce
axis": for inner == 1 (channels_last with dim=1, dim=-1) the channel axis is C itself and the
reduce axis is outer; otherwise the channel axis is outer*C (channel = row % C) and the reduce
axis is inner. Each program keeps its channels' gates in registers and loops over a slice of
the reduce axis; the backward writes grad_x and stores its partial sums of grad_y * x (times the
slope) per channel row, which the launcher sums per channel in a fixed order (float atomics would
add them in the order the GPU schedules the programs: docs/ops.md, "Determinism"). Indices are
int64 from the program ids on: either axis may hold 2**31 elements or more, and an int32 lane past
that would wrap negative, pass its ``< N`` mask and reach outside the tensor.
Semantics: ``backends/reference.py``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ... import _checks
from .. import INTERPRET
from ._common import (
    accumulation_dtype, check_backward_args, check_device, keep, sigmoid_slope, sum_partials, unit_partials,
)

KERNELS = ("channel_gate_forward", "channel_gate_backward")

TILE = 4096  # elements per tile


@triton.jit
def _channel_gate(ch, ch_ok, C, s_ptr, stride_s, thr_ptr, cut_ptr):
    """(scores, kept) of the channels of channel-axis indices ``ch`` (int64)."""
    c = ch % C
    s = tl.load(s_ptr + c * stride_s, mask=ch_ok, other=0)
    return s, keep(s, tl.load(thr_ptr), c, tl.minimum(tl.load(cut_ptr), C)) & ch_ok


@triton.jit
def _gate_forward_kernel(
    x_ptr, y_ptr, s_ptr, thr_ptr, cut_ptr, C, NCH, NRED, stride_ch, stride_red, stride_s, blocks_per_program,
    BLOCK_CH: tl.constexpr, BLOCK_RED: tl.constexpr,
):
    ch = tl.program_id(0).to(tl.int64) * BLOCK_CH + tl.arange(0, BLOCK_CH)
    ch_ok = ch < NCH
    _, kept = _channel_gate(ch, ch_ok, C, s_ptr, stride_s, thr_ptr, cut_ptr)
    first = tl.program_id(1).to(tl.int64) * blocks_per_program
    for i in range(0, blocks_per_program):
        red = (first + i) * BLOCK_RED + tl.arange(0, BLOCK_RED)
        ok = ch_ok[:, None] & (red < NRED)[None, :]
        offs = ch[:, None] * stride_ch + red[None, :] * stride_red
        x = tl.load(x_ptr + offs, mask=ok)
        tl.store(y_ptr + offs, tl.where(kept[:, None], x, x * 0), mask=ok)  # x * gate, bit for bit


@triton.jit
def _gate_backward_kernel(
    g_ptr, x_ptr, gx_ptr, gs_ptr, s_ptr, thr_ptr, cut_ptr, temperature,
    C, NCH, NRED, stride_ch, stride_red, stride_s, blocks_per_program,
    NEED_X: tl.constexpr, SIGMOID: tl.constexpr, ACC: tl.constexpr, S_ACC: tl.constexpr,
    BLOCK_CH: tl.constexpr, BLOCK_RED: tl.constexpr,
):
    ch = tl.program_id(0).to(tl.int64) * BLOCK_CH + tl.arange(0, BLOCK_CH)
    ch_ok = ch < NCH
    s, kept = _channel_gate(ch, ch_ok, C, s_ptr, stride_s, thr_ptr, cut_ptr)
    part = tl.zeros((BLOCK_CH,), dtype=ACC)
    first = tl.program_id(1).to(tl.int64) * blocks_per_program
    for i in range(0, blocks_per_program):
        red = (first + i) * BLOCK_RED + tl.arange(0, BLOCK_RED)
        ok = ch_ok[:, None] & (red < NRED)[None, :]
        offs = ch[:, None] * stride_ch + red[None, :] * stride_red
        g = tl.load(g_ptr + offs, mask=ok, other=0)
        x = tl.load(x_ptr + offs, mask=ok, other=0)
        if NEED_X:
            tl.store(gx_ptr + offs, tl.where(kept[:, None], g, g * 0), mask=ok)
        part += tl.sum(g.to(ACC) * x.to(ACC), axis=1)
    if SIGMOID:
        part = part * sigmoid_slope(s, temperature, S_ACC)
    tl.store(gs_ptr + tl.program_id(1).to(tl.int64) * NCH + ch, part.to(gs_ptr.dtype.element_ty), mask=ch_ok)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _contiguous_view(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, list[int], int]:
    """(a contiguous permutation of t, the permutation, where dim went): no copy for dense layouts."""
    perm = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
    if not t.permute(perm).is_contiguous():
        perm = list(range(t.dim()))
    return t.permute(perm).contiguous(), perm, perm.index(dim)


def _plan(shape: torch.Size, pos: int, device: torch.device):
    """Geometry of the (channel axis, reduce axis) walk and the launch grid."""
    outer, channels = shape[:pos].numel(), shape[pos]
    inner = shape[pos + 1:].numel()
    if inner == 1:
        nch, nred, stride_ch, stride_red = channels, outer, 1, channels
        block_ch = min(triton.next_power_of_2(channels), 128)
        block_red = max(1, min(triton.next_power_of_2(nred), TILE // block_ch))
    else:
        nch, nred, stride_ch, stride_red = outer * channels, inner, inner, 1
        block_red = min(triton.next_power_of_2(inner), 1024)
        block_ch = max(1, min(triton.next_power_of_2(nch), TILE // block_red))
    ch_blocks, red_blocks = triton.cdiv(nch, block_ch), triton.cdiv(nred, block_red)
    target = 4 if INTERPRET else 4 * _sm_count(device.index if device.index is not None else 0)
    per_program = triton.cdiv(red_blocks, max(1, min(red_blocks, triton.cdiv(target, ch_blocks))))
    grid = (ch_blocks, triton.cdiv(red_blocks, per_program))
    return grid, (channels, nch, nred, stride_ch, stride_red), per_program, block_ch, block_red


def _check_gate(x, scores, thr, cut, dim) -> int:
    dim = _checks.check_channel_gate(x, scores, thr, cut, dim)
    check_device(x)
    return dim


def _undo(t: torch.Tensor, perm: list[int]) -> torch.Tensor:
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return t.permute(inverse)


def channel_gate_forward(x, scores, thr, cut, dim):
    """``x * g`` with g = keep(scores) broadcast along ``dim``; keeps x's memory format."""
    dim = _check_gate(x, scores, thr, cut, dim)
    xp, perm, pos = _contiguous_view(x, dim)
    yp = torch.empty_like(xp)
    if xp.numel():
        grid, geometry, per_program, block_ch, block_red = _plan(xp.shape, pos, x.device)
        _gate_forward_kernel[grid](xp, yp, scores, thr, cut, *geometry, scores.stride(0), per_program,
                                   BLOCK_CH=block_ch, BLOCK_RED=block_red)
    return _undo(yp, perm)


def channel_gate_backward(grad_y, x, scores, thr, cut, dim, estimator, temperature, needs):
    """(grad_x, grad_scores) in one pass; grad_scores[c] = sum(grad_y * x over all but dim) * slope."""
    dim = _check_gate(x, scores, thr, cut, dim)
    check_backward_args(grad_y, x.shape, x, estimator, temperature, needs, 2)
    need_x, need_s = (bool(n) for n in needs)
    if not need_s:
        return (channel_gate_forward(grad_y, scores, thr, cut, dim) if need_x else None), None
    xp, perm, pos = _contiguous_view(x, dim)
    gp = grad_y.permute(perm).contiguous()  # a copy only if grad_y's layout differs from x's
    gxp = torch.empty_like(xp) if need_x else None
    if not xp.numel():
        return (_undo(gxp, perm) if need_x else None), torch.zeros_like(scores)
    grid, geometry, per_program, block_ch, block_red = _plan(xp.shape, pos, x.device)
    gs = unit_partials(grid[1], geometry[1], scores, x)  # (programs along the reduce axis, channel rows)
    _gate_backward_kernel[grid](gp, xp, xp if gxp is None else gxp, gs, scores, thr, cut, float(temperature),
                                *geometry, scores.stride(0), per_program,
                                NEED_X=need_x, SIGMOID=estimator == "sigmoid", ACC=accumulation_dtype(x.dtype),
                                S_ACC=accumulation_dtype(scores.dtype), BLOCK_CH=block_ch, BLOCK_RED=block_red)
    return (_undo(gxp, perm) if need_x else None), sum_partials(gs, scores)
