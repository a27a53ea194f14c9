"""Exact top-k selection in Triton: multi-tensor radix select with a warm start and the tie cut.

Design (after RAFT's AIR top-k; docs/select.md compares it with the CUDA and CPU selects):

* Every selection is a set of *problems* (one per tensor in batched mode, one over all tensors in
  list mode) over *chunks* of ``CHUNK`` elements; a small int64 chunk table (address, start, numel,
  flat offset, problem) lets one launch cover every tensor without concatenating them.
* Scores are read through an integer view and mapped to order-preserving unsigned keys (-0.0 first
  becomes +0.0). MSB-first passes of 11-bit digits (3 for fp32, 2 for fp16/bf16): each program
  builds the digit histogram of its chunk's candidates (elements matching the prefix found so
  far) in registers, adds it to the problem's global histogram with atomics and takes a ticket;
  the last program of a problem scans the histogram and picks the digit (no scan launch).
* Candidate compaction: a pass (after the first) whose candidates fit in a small per-problem
  buffer (``CAPACITY``) also appends them (key, flat index) there; later passes then read only
  the buffer (one program), and the tie cut (index of the needed tie in flat order) comes from it.
  Otherwise per-chunk tie counts, a prefix over chunks and one scan of the chunk holding the
  needed tie give the cut.
* Warm start: a hint's key supplies speculative prefixes, so the first pass builds the histograms
  of every level at once (level l counts elements matching the hint's top bits); the scan keeps
  each level whose prefix turns out right. A good hint resolves everything in one read; later
  passes find their problem done and exit at once. Exact either way.

``thr`` and ``cut`` never leave the device; workspaces come from torch's caching allocator.
"""

from __future__ import annotations

import collections
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ... import _checks
from .. import INTERPRET

RADIX = 11
NB = 1 << RADIX  # histogram bins per digit
BLOCK = 64 if INTERPRET else 1024  # elements per loop step
ITERS = 2 if INTERPRET else 16  # loop steps per program: CHUNK = BLOCK * ITERS elements
CHUNK_BLOCK = 8 if INTERPRET else 1024  # chunk counts scanned per step when locating a tie
CAPACITY = 16 if INTERPRET else 2048  # per-problem candidate buffer of the last pass (power of 2)
NUM_WARPS = 8
MAX_SCORES = 2**31 - 2**20  # per problem: int32 counts; the buffer counter may overshoot by CAPACITY + 1

_INT_MIN = tl.constexpr(-(2**31))
_INT64_MAX = tl.constexpr(2**63 - 1)
_KEY_BITS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}
_VIEW = {32: torch.int32, 16: torch.int16}


def _levels(key_bits: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per level: the bit above the digit (``hi``) and its lowest bit (``shift``), MSB first."""
    his = tuple(range(key_bits, 0, -RADIX))
    return his, tuple(max(0, h - RADIX) for h in his)


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def _to_key(bits, KEY_BITS: tl.constexpr):
    """Raw float bits -> unsigned order key in an int32 (-0.0 canonicalised to +0.0)."""
    b = bits.to(tl.int32)
    if KEY_BITS == 32:
        b = tl.where(b == _INT_MIN, 0, b)
        return (b ^ ((b >> 31) & 0x7FFFFFFF)) ^ _INT_MIN
    else:
        b = tl.where(b == -32768, 0, b)
        return (b ^ ((b >> 15) & 0x7FFF)) + 32768


@triton.jit
def _from_key(key, KEY_BITS: tl.constexpr):
    """Inverse of :func:`_to_key`: the float's bits (sign-extended to int32 for 16-bit floats)."""
    if KEY_BITS == 32:
        s = key ^ _INT_MIN
        return s ^ ((s >> 31) & 0x7FFFFFFF)
    else:
        s = key - 32768
        return s ^ ((s >> 15) & 0x7FFF)


@triton.jit
def _digit(key, HI: tl.constexpr, SHIFT: tl.constexpr):
    """The key's bits [SHIFT, HI): one radix digit."""
    return (key >> SHIFT) & ((1 << (HI - SHIFT)) - 1)


@triton.jit
def _level_hist(key, prefix, m, HI: tl.constexpr, SHIFT: tl.constexpr, NB: tl.constexpr):
    """Histogram of the digit below ``HI`` over the valid keys that match the prefix above it."""
    if HI >= 32:
        cand = m
    else:
        cand = m & ((key >> HI) == (prefix >> HI))
    return tl.histogram(_digit(key, HI, SHIFT), NB, mask=cand)


@triton.jit
def _pick_digit(row_ptr, krem, NB: tl.constexpr):
    """Digit holding rank ``krem`` (1-based, descending) of a histogram row; count above; its count."""
    i = tl.arange(0, NB)
    rev = tl.load(row_ptr + (NB - 1 - i), volatile=True).to(tl.int64)
    cum = tl.cumsum(rev, 0)
    below = cum < krem
    pos = tl.sum(below.to(tl.int32), 0)
    above = tl.sum(tl.where(below, rev, 0), 0)
    count = tl.sum(tl.where(i == pos, rev, 0), 0)
    return NB - 1 - pos, above, count


@triton.jit
def _load_chunk(table_ptr, C, c, KEY_BITS: tl.constexpr):
    addr = tl.load(table_ptr + c)
    if KEY_BITS == 32:
        ptr = addr.to(tl.pointer_type(tl.int32))
    else:
        ptr = addr.to(tl.pointer_type(tl.int16))
    start = tl.load(table_ptr + C + c)
    numel = tl.load(table_ptr + 2 * C + c)
    base = tl.load(table_ptr + 3 * C + c)
    prob = tl.load(table_ptr + 4 * C + c)
    return ptr, start, numel, base, prob


@triton.jit
def _compact(key, cand, flat, prob, room, cnt_ptr, buf_key_ptr, buf_idx_ptr, CAPACITY: tl.constexpr):
    """Append the candidates (key, flat index) to the problem's buffer; returns whether it may have room.

    Every branch here is uniform over the program's threads: ``n`` is a reduction and the slot base
    comes from one scalar atomic, which Triton broadcasts. Other programs fill the buffer while this
    one runs, so the counter must never be read with a plain load and branched on: each thread loads
    on its own, warps of one program then disagree, and a branch around the atomic's internal
    barrier diverges (compiled only; the interpreter runs programs one after another). A program
    whose atomic finds the buffer full stops appending: the counter already exceeds CAPACITY, which
    marks the buffer incomplete.
    """
    n = tl.sum(cand.to(tl.int32), 0)
    if room & (n > 0):
        base = tl.atomic_add(cnt_ptr + prob, n)
        slot = base + tl.cumsum(cand.to(tl.int32), 0) - 1
        ok = cand & (slot < CAPACITY)
        tl.store(buf_key_ptr + prob * CAPACITY + slot, key, mask=ok)
        tl.store(buf_idx_ptr + prob * CAPACITY + slot, flat, mask=ok)
        room = base + n <= CAPACITY
    return room


@triton.jit
def _next_buffer(cnt_ptr, bufl_ptr, prob, count, LEVEL: tl.constexpr, CAPACITY: tl.constexpr):
    """After a pass at LEVEL: keep a filled buffer, mark one just filled, else arm or disarm the next pass.

    The buffer holds every candidate of level ``bufl`` (>= 1) once filled. The next pass appends
    while the counter ``cnt`` stays <= CAPACITY: 0 arms it (its candidates fit), CAPACITY + 1
    disarms it (each program then spends one atomic to find that out).
    """
    if tl.load(bufl_ptr + prob) == 0:
        if LEVEL >= 1 and tl.load(cnt_ptr + prob, volatile=True) <= CAPACITY:
            tl.store(bufl_ptr + prob, LEVEL)
        else:
            tl.store(cnt_ptr + prob, tl.where(count <= CAPACITY, 0, CAPACITY + 1))


@triton.jit
def _level_scan(row_ptr, pref, prob, level_ptr, pref_ptr, krem_ptr, cnt_ptr, bufl_ptr, thr_ptr,
                KEY_BITS: tl.constexpr, NLEV: tl.constexpr, LEVEL: tl.constexpr, SHIFTS: tl.constexpr,
                NB: tl.constexpr, CAPACITY: tl.constexpr):
    """Pick this level's digit from the problem's histogram row and advance the problem's state."""
    krem = tl.load(krem_ptr + prob)
    d, above, count = _pick_digit(row_ptr, krem, NB)
    pref = pref | (d.to(tl.int32) << SHIFTS[LEVEL])
    tl.store(pref_ptr + prob, pref)
    tl.store(krem_ptr + prob, krem - above)
    tl.store(level_ptr + prob, LEVEL + 1)
    if LEVEL + 1 == NLEV:
        tl.store(thr_ptr + prob, _from_key(pref, KEY_BITS))
    else:
        _next_buffer(cnt_ptr, bufl_ptr, prob, count, LEVEL, CAPACITY)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _digit_pass_kernel(
    table_ptr, C, chunk_ptr, hint_ptr, level_ptr, pref_ptr, krem_ptr, cnt_ptr, bufl_ptr, hist_ptr, ticket_ptr,
    thr_ptr, buf_key_ptr, buf_idx_ptr,
    KEY_BITS: tl.constexpr, NLEV: tl.constexpr, LEVEL: tl.constexpr, SPEC: tl.constexpr,
    HIS: tl.constexpr, SHIFTS: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
    CAPACITY: tl.constexpr,
):
    """Histogram of one digit level (or, with SPEC, of every level under the hint's prefixes).

    A problem whose candidates were compacted reads only its buffer, in its first chunk's program.
    """
    c = tl.program_id(0)
    ptr, start, numel, base, prob = _load_chunk(table_ptr, C, c, KEY_BITS)
    first = tl.load(chunk_ptr + prob)
    if SPEC:
        active = prob == prob
        buffered = prob != prob
        pref = _to_key(tl.load(hint_ptr + prob), KEY_BITS)
    else:
        active = tl.load(level_ptr + prob) == LEVEL
        buffered = tl.load(bufl_ptr + prob) > 0
        pref = tl.load(pref_ptr + prob)
    bins = tl.arange(0, NB)
    if active & ~buffered:
        room = active  # a full buffer (counter > CAPACITY at launch) is found by the first append
        h0 = tl.zeros([NB], dtype=tl.int32)
        h1 = tl.zeros([NB], dtype=tl.int32)
        h2 = tl.zeros([NB], dtype=tl.int32)
        for it in range(ITERS):
            offs = start + it * BLOCK + tl.arange(0, BLOCK)
            m = offs < numel
            key = _to_key(tl.load(ptr + offs, mask=m, other=0), KEY_BITS)
            if SPEC:
                h0 += _level_hist(key, pref, m, HIS[0], SHIFTS[0], NB)
                h1 += _level_hist(key, pref, m, HIS[1], SHIFTS[1], NB)
                if NLEV > 2:
                    h2 += _level_hist(key, pref, m, HIS[2], SHIFTS[2], NB)
                room = _compact(key, m & ((key >> HIS[NLEV - 1]) == (pref >> HIS[NLEV - 1])), base + offs, prob,
                                room, cnt_ptr, buf_key_ptr, buf_idx_ptr, CAPACITY)
            else:
                h0 += _level_hist(key, pref, m, HIS[LEVEL], SHIFTS[LEVEL], NB)
                if LEVEL >= 1:
                    room = _compact(key, m & ((key >> HIS[LEVEL]) == (pref >> HIS[LEVEL])), base + offs, prob,
                                    room, cnt_ptr, buf_key_ptr, buf_idx_ptr, CAPACITY)
        if SPEC:
            row = hist_ptr + prob * (2 * NLEV) * NB + NLEV * NB
            tl.atomic_add(row + bins, h0, mask=h0 > 0)
            tl.atomic_add(row + NB + bins, h1, mask=h1 > 0)
            if NLEV > 2:
                tl.atomic_add(row + 2 * NB + bins, h2, mask=h2 > 0)
        else:
            tl.atomic_add(hist_ptr + (prob * 2 * NLEV + LEVEL) * NB + bins, h0, mask=h0 > 0)
        nchunks = tl.load(chunk_ptr + prob + 1) - first
        tl.debug_barrier()  # every thread's histogram atomics precede the ticket
        ticket = tl.atomic_add(ticket_ptr + prob * (NLEV + 1) + LEVEL, 1)
        if ticket == nchunks - 1:  # the last program of this problem picks the digit(s)
            if SPEC:
                _spec_scan(hist_ptr + prob * (2 * NLEV) * NB + NLEV * NB, pref, prob, level_ptr, pref_ptr,
                           krem_ptr, cnt_ptr, thr_ptr, KEY_BITS, NLEV, HIS, SHIFTS, NB, CAPACITY)
            else:
                _level_scan(hist_ptr + (prob * 2 * NLEV + LEVEL) * NB, pref, prob, level_ptr, pref_ptr, krem_ptr,
                            cnt_ptr, bufl_ptr, thr_ptr, KEY_BITS, NLEV, LEVEL, SHIFTS, NB, CAPACITY)
    if active & buffered & (c == first):
        i = tl.arange(0, CAPACITY)
        valid = i < tl.load(cnt_ptr + prob)
        keys = tl.load(buf_key_ptr + prob * CAPACITY + i, mask=valid, other=0)
        row = hist_ptr + (prob * 2 * NLEV + LEVEL) * NB
        tl.store(row + bins, _level_hist(keys, pref, valid, HIS[LEVEL], SHIFTS[LEVEL], NB))
        tl.debug_barrier()  # the row is complete before it is scanned
        _level_scan(row, pref, prob, level_ptr, pref_ptr, krem_ptr, cnt_ptr, bufl_ptr, thr_ptr,
                    KEY_BITS, NLEV, LEVEL, SHIFTS, NB, CAPACITY)


@triton.jit
def _spec_scan(row_ptr, hint_key, prob, level_ptr, pref_ptr, krem_ptr, cnt_ptr, thr_ptr,
               KEY_BITS: tl.constexpr, NLEV: tl.constexpr, HIS: tl.constexpr, SHIFTS: tl.constexpr,
               NB: tl.constexpr, CAPACITY: tl.constexpr):
    """Resolve levels while the hint's prefix holds: level l's histogram is valid iff digits < l matched.

    All resolved: the buffer filled under the hint's prefix holds the last level's candidates.
    Otherwise the next pass compacts its candidates if they fit.
    """
    krem = tl.load(krem_ptr + prob)
    pref = hint_key & 0
    level = prob.to(tl.int32) * 0
    count = krem * 0
    ok = level == 0
    for lv in tl.static_range(NLEV):
        d, above, n = _pick_digit(row_ptr + lv * NB, krem, NB)
        pref = tl.where(ok, pref | (d.to(tl.int32) << SHIFTS[lv]), pref)
        krem = tl.where(ok, krem - above, krem)
        count = tl.where(ok, n, count)
        level = tl.where(ok, lv + 1, level)
        ok = ok & (d.to(tl.int32) == _digit(hint_key, HIS[lv], SHIFTS[lv]))
    tl.store(pref_ptr + prob, pref)
    tl.store(krem_ptr + prob, krem)
    tl.store(level_ptr + prob, level)
    if level == NLEV:
        tl.store(thr_ptr + prob, _from_key(pref, KEY_BITS))
    else:
        tl.store(cnt_ptr + prob, tl.where(count <= CAPACITY, 0, CAPACITY + 1))


@triton.jit
def _tie_kernel(
    table_ptr, C, chunk_ptr, pref_ptr, krem_ptr, cnt_ptr, ticket_ptr, tie_cnt_ptr, cut_ptr,
    buf_key_ptr, buf_idx_ptr,
    KEY_BITS: tl.constexpr, NLEV: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
    CAPACITY: tl.constexpr, CHUNK_BLOCK: tl.constexpr,
):
    """The tie cut: 1 + flat index of the ``krem``-th element equal to the threshold key."""
    c = tl.program_id(0)
    ptr, start, numel, base, prob = _load_chunk(table_ptr, C, c, KEY_BITS)
    thr_key = tl.load(pref_ptr + prob)
    overflow = tl.load(cnt_ptr + prob) > CAPACITY
    if overflow:  # count this chunk's ties (the buffer missed some candidates)
        ties = tl.zeros([BLOCK], dtype=tl.int32)
        for it in range(ITERS):
            offs = start + it * BLOCK + tl.arange(0, BLOCK)
            m = offs < numel
            key = _to_key(tl.load(ptr + offs, mask=m, other=0), KEY_BITS)
            ties += (m & (key == thr_key)).to(tl.int32)
        tl.atomic_add(tie_cnt_ptr + c, tl.sum(ties, 0))  # an atomic: ordered before the ticket by itself
    first = tl.load(chunk_ptr + prob)
    last = tl.load(chunk_ptr + prob + 1)
    tl.debug_barrier()  # every thread is done with this chunk before the ticket
    ticket = tl.atomic_add(ticket_ptr + prob * (NLEV + 1) + NLEV, 1)
    if ticket == last - first - 1:
        need = tl.load(krem_ptr + prob)
        if overflow:
            cut = _cut_from_chunks(table_ptr, C, first, last, tie_cnt_ptr, thr_key, need,
                                   KEY_BITS, BLOCK, ITERS, CHUNK_BLOCK)
        else:
            cut = _cut_from_buffer(buf_key_ptr, buf_idx_ptr, cnt_ptr, prob, thr_key, need, CAPACITY)
        tl.store(cut_ptr + prob, cut)


@triton.jit
def _cut_from_buffer(buf_key_ptr, buf_idx_ptr, cnt_ptr, prob, thr_key, need, CAPACITY: tl.constexpr):
    """All ties are in the buffer (unordered): sort their indices and take the need-th."""
    i = tl.arange(0, CAPACITY)
    valid = i < tl.load(cnt_ptr + prob, volatile=True)
    keys = tl.load(buf_key_ptr + prob * CAPACITY + i, mask=valid, other=0, volatile=True)
    idx = tl.load(buf_idx_ptr + prob * CAPACITY + i, mask=valid, other=0, volatile=True)
    ordered = tl.sort(tl.where(valid & (keys == thr_key), idx, _INT64_MAX))
    return tl.sum(tl.where(i == need - 1, ordered, 0), 0) + 1


@triton.jit
def _cut_from_chunks(table_ptr, C, first, last, tie_cnt_ptr, thr_key, need,
                     KEY_BITS: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, CHUNK_BLOCK: tl.constexpr):
    """Prefix over the per-chunk tie counts finds the chunk; a scan of that chunk finds the tie."""
    before = need * 0
    target = first * 0
    rank = need * 0
    for j0 in range(first, last, CHUNK_BLOCK):
        j = j0 + tl.arange(0, CHUNK_BLOCK)
        counts = tl.load(tie_cnt_ptr + j, mask=j < last, other=0, volatile=True).to(tl.int64)
        cum = before + tl.cumsum(counts, 0)
        hit = (j < last) & (cum >= need) & (cum - counts < need)
        found = tl.sum(hit.to(tl.int32), 0) > 0
        target = tl.where(found, tl.sum(tl.where(hit, j, 0), 0), target)
        rank = tl.where(found, tl.sum(tl.where(hit, need - (cum - counts), 0), 0), rank)
        before += tl.sum(counts, 0)
    ptr, start, numel, base, prob = _load_chunk(table_ptr, C, target, KEY_BITS)
    seen = need * 0
    pos = need * 0
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        tie = m & (_to_key(tl.load(ptr + offs, mask=m, other=0), KEY_BITS) == thr_key)
        running = seen + tl.cumsum(tie.to(tl.int64), 0)
        pos += tl.sum(tl.where(tie & (running == rank), base + offs, 0), 0)
        seen += tl.sum(tie.to(tl.int64), 0)
    return pos + 1


@triton.jit
def _keep_mask_kernel(bits_ptr, thr_ptr, cut_ptr, out_ptr, n, offset, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Compares order keys, not floats: exact for every dtype (also bf16 under the interpreter)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    key = _to_key(tl.load(bits_ptr + offs, mask=m, other=0), KEY_BITS)
    thr = _to_key(tl.load(thr_ptr), KEY_BITS)
    if KEY_BITS == 32:  # unsigned order of the keys = signed order with the top bit flipped
        key = key ^ _INT_MIN
        thr = thr ^ _INT_MIN
    keep = (key > thr) | ((key == thr) & (offset + offs < tl.load(cut_ptr)))
    tl.store(out_ptr + offs, keep, mask=m)


# ----------------------------------------------------------------------------- launchers


_PLANS: collections.OrderedDict = collections.OrderedDict()
_MAX_PLANS = 64


def _plan(tensors: Sequence[torch.Tensor], problems: Sequence[int], ks: Sequence[int]):
    """Chunk table (5, C) int64, per-problem chunk offsets and ks on the device, cached by layout.

    The table holds addresses and sizes only, so a cached plan stays right for any tensors at the
    same addresses with the same sizes (e.g. the same parameters step after step), and the
    per-call host work is building this key.
    """
    device = tensors[0].device
    chunk = BLOCK * ITERS
    key = (device, chunk, tuple((t.data_ptr(), t.numel()) for t in tensors), tuple(problems), tuple(ks))
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    rows: list[list[int]] = [[], [], [], [], []]
    offsets = [0] * len(ks)
    firsts = [0] * (len(ks) + 1)
    for t, p in zip(tensors, problems):
        for start in range(0, t.numel(), chunk):
            for row, value in zip(rows, (t.data_ptr(), start, t.numel(), offsets[p], p)):
                row.append(value)
        offsets[p] += t.numel()
        firsts[p + 1] = len(rows[0])
    for p, total in enumerate(offsets):
        if total > MAX_SCORES:
            raise ValueError(f"problem {p} has {total} scores; the Triton select supports at most {MAX_SCORES}")
    plan = tuple(_upload(torch.tensor(x, dtype=torch.int64), device) for x in (rows, firsts, list(ks)))
    _PLANS[key] = plan
    if len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


def _upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without a host sync (pinned, non-blocking) on CUDA."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _select(tensors: Sequence[torch.Tensor], problems: Sequence[int], ks: Sequence[int],
            hints: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Radix select of every problem; returns thresholds (dtype) and cuts (int64), shape (P,)."""
    dtype = tensors[0].dtype
    key_bits = _KEY_BITS[dtype]
    flat = [t if t.is_contiguous() else t.contiguous() for t in tensors]  # the kernels read raw addresses
    table, firsts, ks_dev = _plan(flat, problems, ks)
    device, P, C = flat[0].device, len(ks), table.shape[1]
    his, shifts = _levels(key_bits)
    nlev = len(his)
    i32 = torch.zeros(P * (2 * nlev * NB + nlev + 1 + 4) + C, dtype=torch.int32, device=device)
    hist, tickets, level, pref, cnt, bufl, tie_cnt = torch.split(
        i32, [P * 2 * nlev * NB, P * (nlev + 1), P, P, P, P, C])
    thr_bits = torch.empty(P, dtype=torch.int32, device=device)  # written, never read: the result, no view of i32
    krem = ks_dev.clone()
    cut = torch.empty(P, dtype=torch.int64, device=device)
    buf_key = torch.empty(P * CAPACITY, dtype=torch.int32, device=device)
    buf_idx = torch.empty(P * CAPACITY, dtype=torch.int64, device=device)
    hint_bits = None if hints is None else hints.reshape(-1).to(device, dtype).contiguous().view(_VIEW[key_bits])
    common = dict(KEY_BITS=key_bits, NLEV=nlev, HIS=his, SHIFTS=shifts, NB=NB, BLOCK=BLOCK, ITERS=ITERS,
                  CAPACITY=CAPACITY, num_warps=NUM_WARPS)
    args = (table, C, firsts, hint_bits if hint_bits is not None else table, level, pref, krem, cnt, bufl, hist,
            tickets, thr_bits, buf_key, buf_idx)
    for lv in range(nlev):
        if lv == 0 and hint_bits is not None:
            _digit_pass_kernel[(C,)](*args, LEVEL=0, SPEC=True, **common)
        else:
            _digit_pass_kernel[(C,)](*args, LEVEL=lv, SPEC=False, **common)
    _tie_kernel[(C,)](table, C, firsts, pref, krem, cnt, tickets, tie_cnt, cut, buf_key, buf_idx,
                      KEY_BITS=key_bits, NLEV=nlev, BLOCK=BLOCK, ITERS=ITERS, CAPACITY=CAPACITY,
                      CHUNK_BLOCK=CHUNK_BLOCK, num_warps=NUM_WARPS)
    thr = thr_bits.view(dtype) if key_bits == 32 else thr_bits.to(torch.int16).view(dtype)
    return thr, cut


def topk_select(tensors: Sequence[torch.Tensor], k: int, hint: Optional[torch.Tensor] = None):
    """Exact top-k over the virtual concatenation of ``tensors`` (see reference.topk_select)."""
    _checks.check_select(tensors, [k])
    hints = None if hint is None else hint.reshape(1)
    thr, cut = _select(tensors, [0] * len(tensors), [k], hints)
    return thr.reshape(()), cut.reshape(())


def batched_topk_select(tensors: Sequence[torch.Tensor], ks: Sequence[int], hints: Optional[torch.Tensor] = None):
    """One independent top-k per tensor, all in the same launches (see reference.batched_topk_select)."""
    _checks.check_select(tensors, ks, batched=True)
    return _select(tensors, list(range(len(tensors))), list(ks), hints)


def keep_mask(scores: torch.Tensor, thr: torch.Tensor, cut: torch.Tensor, offset: int = 0,
              check_finite: bool = False) -> torch.Tensor:
    """Bool mask ``s > thr or (s == thr and offset + flat_index < cut)`` (see reference.keep_mask;
    ``check_finite`` as there, in Python: not in "auto" for keep_mask on CUDA)."""
    if check_finite:
        _checks.check_selection_finite(scores, thr)
    view = _VIEW[_KEY_BITS[scores.dtype]]
    out = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    n = scores.numel()
    _keep_mask_kernel[(triton.cdiv(n, BLOCK),)](
        scores.contiguous().view(view), thr.reshape(()).contiguous().view(view), cut.reshape(()), out, n, offset,
        KEY_BITS=_KEY_BITS[scores.dtype], BLOCK=BLOCK)
    return out


KERNELS = ("topk_select", "batched_topk_select", "keep_mask")
DTYPES = tuple(_KEY_BITS)
"""16- and 32-bit keys only: the registry leaves float64 scores to the next backend of its order."""
