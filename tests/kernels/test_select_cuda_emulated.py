"""The CUDA selects (csrc/cuda/select*.cu) and keep_mask on the CPU, against the reference backend,
bit for bit.

No GPU is needed: the kernels are compiled by g++ against a small CUDA emulation
(select_cuda_emu/emu.h: blocks one after another, the threads of a block as fibers that meet at
barriers and warp collectives) and run by select_cuda_emu/harness.cpp, which lays out the chunk
table and workspaces as csrc/cuda/select_binding.cpp does. This checks the kernels' logic, index
arithmetic and the structure of their barriers and warp collectives on every path of both
algorithms (radix; bracket: single value, buffered, missed, overflowed, forced fallbacks), not
races between blocks or the memory model: tests/kernels/test_select_cuda.py does that on a GPU.
Skipped without g++ or off Linux x86-64.
"""

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _oracle import adversarial_inputs
from bise_kernels.backends import reference as ref

ROOT = Path(__file__).resolve().parents[2]
EMU = Path(__file__).resolve().parent / "select_cuda_emu"
CXX = shutil.which("g++")
ALGOS = {"radix": 0, "bracket": 1, "bracket-miss": 2, "bracket-overflow": 3}
NOT_FINITE = "scores contains non-finite values (NaN or inf)"  # csrc/cuda/device_check.cuh
MISSED, SINGLE, BUFFERED, OVERFLOWED = 0, 1, 2, 3
VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
INF_BITS = {torch.float64: 0x7FF0000000000000, torch.float32: 0x7F800000, torch.float16: 0x7C00, torch.bfloat16: 0x7F80}

pytestmark = pytest.mark.skipif(CXX is None or sys.platform != "linux" or platform.machine() != "x86_64",
                                reason="the CUDA emulation needs g++ on Linux x86-64")


def _for_the_cpu(source: str) -> str:
    """A .cu file as C++ over emu.h: no cub headers, launches as emu::launch calls."""
    source = re.sub(r"#include <cub/[^>]*>\n", "", source)
    launches = source.count("<<<")
    source, done = re.subn(r"(\w+<[^<>]*?>)<<<([^,]+), ([^,]+), 0, stream>>>\(([^;]*)\);",
                           r"emu::launch(\2, \3, [&] { \1(\4); });", source)
    assert done == launches, "a kernel launch the emulation does not recognise"
    return '#include "emu.h"\n' + source


def build_harness(build: Path) -> Path:
    """Compiles the harness in the empty folder ``build`` (also used by scripts/fuzz_select.py)."""
    (build / "cuda").mkdir()
    (build / "stub").mkdir()
    (build / "stub" / "cuda_runtime_api.h").write_text("#pragma once\n")
    shutil.copy(ROOT / "csrc" / "select_bracket.h", build / "select_bracket.h")
    for header in ("select.h", "device_check.cuh"):
        shutil.copy(ROOT / "csrc" / "cuda" / header, build / "cuda" / header)
    common = (ROOT / "csrc" / "cuda" / "select_common.cuh").read_text()
    (build / "cuda" / "select_common.cuh").write_text(re.sub(r"#include <cub/[^>]*>\n", "", common))
    sources = [EMU / "harness.cpp"]
    for name in ("select", "select_bracket"):
        sources.append(build / "cuda" / f"{name}.cpp")
        sources[-1].write_text(_for_the_cpu((ROOT / "csrc" / "cuda" / f"{name}.cu").read_text()))
    binary = build / "harness"
    flags = ["-std=c++20", "-O1", f"-I{EMU}", f"-I{build}", f"-I{build / 'cuda'}", f"-I{build / 'stub'}"]
    done = subprocess.run([CXX, *flags, *map(str, sources), "-o", str(binary)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return binary


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return build_harness(tmp_path_factory.mktemp("select_cuda_emu"))


class Runs:
    """Selections to run in one harness call, each with its reference result."""

    def __init__(self):
        self.words, self.want, self.masks, self.count = [], [], [], 0

    def add(self, algo: str, tensors, ks, hints=None, shift=0, nonfinite=False, masks=False):
        """One call: ``len(ks)`` problems (batched: one tensor each; else ``ks`` has one k for all),
        each tensor ``shift`` elements into its allocation. ``nonfinite``: the scores hold a NaN or
        inf, so the call's finiteness check (a device-side assert) must fail, and its result is not
        compared; else the check must pass. ``masks``: also
        topk_keep_mask's masks (bracket algorithms, one problem), compared with the reference's."""
        dtype = tensors[0].dtype
        problems = [[t] for t in tensors] if len(ks) > 1 else [list(tensors)]
        self.words += [8 * dtype.itemsize, ALGOS[algo], INF_BITS[dtype], shift, int(masks), len(problems)]
        for p, (group, k) in enumerate(zip(problems, ks)):
            hint = None if hints is None else hints.reshape(-1)[p].to(dtype)
            self.words += [k, hint is not None, 0 if hint is None else self._bits(hint.reshape(1))[0], len(group)]
            for t in group:
                self.words += [t.numel(), *self._bits(t)]
        if nonfinite:
            self.want += [(algo, p, None, None, None, None) for p in range(len(problems))]
        else:
            thr, cut = ref.batched_topk_select(tensors, ks) if len(ks) > 1 else ref.topk_select(tensors, ks[0])
            for p, (group, t, c) in enumerate(zip(problems, thr.reshape(-1), cut.reshape(-1))):
                flat = torch.cat([x.reshape(-1) for x in group])
                kept = torch.arange(1, flat.numel() + 1)[ref.keep_mask(flat, t, c)]  # flat index + 1 of each kept entry
                keep = (kept.numel(), int((kept * kept).sum()))
                self.want.append((algo, p, int(self._bits(t.reshape(1))[0]), int(c), *keep))
        if not masks:
            self.masks.append([])
        elif nonfinite:  # not compared: their sizes, to skip their words
            self.masks.append([t.shape for t in tensors])
        else:
            self.masks.append(ref.topk_keep_mask(tensors, ks[0]))
        self.count += 1

    def _problem_counts(self) -> list[int]:
        """The number of problems of each call, in order."""
        counts = []
        for algo, p, *_ in self.want:
            if p == 0:
                counts.append(0)
            counts[-1] += 1
        return counts

    @staticmethod
    def _bits(t: torch.Tensor) -> list[int]:
        view = t.contiguous().reshape(-1).view(VIEW[t.dtype]).to(torch.int64)
        return (view if t.dtype == torch.float64 else view & (1 << 8 * t.dtype.itemsize) - 1).tolist()

    def run(self, harness, tmp_path, env=None):
        (tmp_path / "in.bin").write_bytes(torch.tensor([self.count] + self.words, dtype=torch.int64).numpy().tobytes())
        done = subprocess.run([str(harness), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                              capture_output=True, text=True, timeout=900, env=env)
        assert done.returncode == 0, done.stderr[-4000:]
        # the failed checks' messages; "GUARD ...": a write past an array's end (harness.cpp)
        assert set(done.stdout.splitlines()) <= {NOT_FINITE}, done.stdout[-4000:]
        words = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.int64)
        rows, at = [], 0
        for problems, masks in zip(self._problem_counts(), self.masks):
            rows += words[at:at + 6 * problems].reshape(-1, 6).tolist()
            at += 6 * problems
            for want in masks:
                if isinstance(want, torch.Tensor):
                    got = words[at:at + want.numel()].reshape(want.shape).bool()
                    assert torch.equal(got, want), ("mask", len(rows), int((got != want).sum()))
                at += want.numel()
        assert at == words.numel() and len(rows) == len(self.want)
        paths = {}
        for i, ((algo, p, thr, cut, kept, index_sum), (got_thr, got_cut, path, *got_keep, failed)) in enumerate(
                zip(self.want, rows)):
            assert (failed > 0) == (thr is None), (i, algo, p, "failed finiteness checks", failed)
            if thr is None:
                continue
            assert (got_thr, got_cut) == (thr, cut), (algo, p, (got_thr, got_cut), (thr, cut))
            assert path != 100, (algo, p, "solved flag disagrees with the bracket's outcome")
            assert got_keep == [kept, index_sum], (algo, p, "keep_mask", got_keep, (kept, index_sum))
            paths.setdefault(algo, set()).add(path)
        return paths


def _hints(x: torch.Tensor, k: int) -> list:
    """No hint, the exact threshold, its bits plus 2^(bits / 5) (the hinted pass resolves the high
    digits and misses a low one: float64's 5th of 6), one 1% of the ranks off (stale)."""
    order = torch.sort(x.reshape(-1), descending=True).values
    bits = order[k - 1].reshape(1).view(VIEW[x.dtype])
    near = (bits + (1 << 8 * x.dtype.itemsize // 5)).view(x.dtype)[0]
    return [None, order[k - 1], near, order[min(x.numel() - 1, k - 1 + max(3, x.numel() // 100))]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_adversarial_inputs_hints_and_batches(harness, tmp_path, dtype):
    runs = Runs()
    n = 300
    inputs = adversarial_inputs(n, dtype, seed=4)
    for x in inputs.values():
        for k in (1, 2, n // 2, n - 1, n):
            for hint in _hints(x, k):
                for algo in ALGOS:
                    runs.add(algo, [x], [k], hint)
    g = torch.Generator().manual_seed(5)
    layers = list(inputs.values()) + [torch.randn(1, generator=g).to(dtype)]
    ks = [1 + (i * 97) % t.numel() for i, t in enumerate(layers)]
    hints = torch.stack([t.reshape(-1)[i % t.numel()] for i, t in enumerate(layers)])
    for algo in ALGOS:
        runs.add(algo, layers, ks)
        runs.add(algo, layers, ks, hints)
    paths = runs.run(harness, tmp_path)
    assert {SINGLE, BUFFERED, MISSED} <= paths["bracket"]
    assert paths["bracket-miss"] == {MISSED}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_several_chunks_lists_overflow_and_finishing_blocks(harness, tmp_path, dtype):
    """Lists over several 16384-element chunks (also all tied, +-0.0), 40% ties at the threshold
    (the buffer overflows, also under a hint at the threshold), and a buffer of more than 4096
    candidates (several blocks per finishing level)."""
    runs = Runs()
    g = torch.Generator().manual_seed(6)
    tensors = [torch.randn(20_000, generator=g), torch.randint(0, 3, (7,), generator=g).float(),
               torch.zeros(5), torch.randn(17_000, generator=g)[1:]]
    tensors = [t.to(dtype) for t in tensors]
    total = sum(t.numel() for t in tensors)
    for k in (1, 100, total // 2, total):
        for algo in ALGOS:
            runs.add(algo, tensors, [k])
    tied = [torch.zeros(300, dtype=dtype), torch.full((50,), -0.0, dtype=dtype), torch.zeros(20_000, dtype=dtype)]
    for k in (1, 320, 10_000):  # the cut in each tensor: keep_mask's offsets
        for algo in ALGOS:
            runs.add(algo, tied, [k])
    ties = torch.randn(20_000, generator=g).to(dtype)
    ties[::5] = 0.3  # low digits not 0
    ties[1::5] = 0.3
    above = int((ties > 0.3).sum())
    for algo in ALGOS:
        for k in (above + 1, above + 5000):
            runs.add(algo, [ties], [k])
            runs.add(algo, [ties], [k], torch.tensor(0.3, dtype=dtype))
    big = torch.randn(150_000, generator=g).to(dtype)
    for hint in _hints(big, 60_000):
        runs.add("bracket", [big], [60_000], hint)
    paths = runs.run(harness, tmp_path)
    assert {OVERFLOWED, BUFFERED, MISSED} <= paths["bracket"]
    assert paths["bracket-overflow"] <= {SINGLE, OVERFLOWED, MISSED}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_the_first_pass_asserts_on_nan_and_inf_anywhere(harness, tmp_path, dtype):
    """The finiteness check (a device-side assert) of both selects (radix: the level-0 or hinted
    pass; bracket: the fused pass, also writing topk_keep_mask's masks; and the fallbacks) fails
    with the one message for a NaN or inf as the first or last element, in the 128-bit groups, in
    the scalar tail of a chunk, in a second chunk, in an unaligned tensor, in the second tensor of a
    list or of a batch; never for finite scores, +-max and -0.0 included."""
    runs = Runs()
    g = torch.Generator().manual_seed(7)
    n = 16_384 + 1_001  # two chunks; the second ends in a scalar tail
    x = torch.randn(n, generator=g).to(dtype)
    info = torch.finfo(dtype)
    x[:3] = torch.tensor([info.max, -info.max, -0.0], dtype=dtype)
    small = torch.randn(37, generator=g).to(dtype)
    for algo in ALGOS:
        for k in (1, n // 2):
            runs.add(algo, [x], [k])
            runs.add(algo, [small, x], [k], shift=1)
            runs.add(algo, [small, x], [5, k], x.reshape(-1)[:2].clone())
            if algo != "radix":  # topk_keep_mask (the radix select's is the select, then keep_mask)
                runs.add(algo, [small, x], [k], shift=1, masks=True)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, n - 1, 5_000, 16_383, 16_384, n - 7):
            y = x.clone()
            y[pos] = bad
            for algo in ALGOS:
                runs.add(algo, [y], [n // 2], nonfinite=True)
                runs.add(algo, [y], [3], y[10:11].clone(), nonfinite=True)  # the hinted pass
            runs.add("bracket", [small, y], [n // 2], shift=1, nonfinite=True)
            runs.add("radix", [small, y], [5, 9], shift=1, nonfinite=True)
            runs.add("bracket", [y, small], [3], y[10:11].clone(), nonfinite=True, masks=True)
    runs.run(harness, tmp_path)


def test_topk_keep_mask_on_every_path_of_the_bracket_select(harness, tmp_path):
    """topk_keep_mask's masks, bit for bit the reference's (topk_select then keep_mask): buffered
    problems (the fused pass writes key > hi, mask_inside_kernel the buffer's entries), single value,
    missed and overflowed (mask_rest_kernel), lists over several chunks, unaligned tensors, hints."""
    runs = Runs()
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for x in adversarial_inputs(300, dtype, seed=11).values():
            for k in (1, 150, 300):
                for algo in ("bracket", "bracket-miss", "bracket-overflow"):
                    runs.add(algo, [x], [k], masks=True)
    g = torch.Generator().manual_seed(12)
    tensors = [torch.randn(20_000, generator=g), torch.randint(0, 3, (7,), generator=g).float(), torch.zeros(5),
               torch.randn(17_000, generator=g)[1:]]
    total = sum(t.numel() for t in tensors)
    for k in (1, total // 3, total):
        runs.add("bracket", tensors, [k], masks=True)
        runs.add("bracket", tensors, [k], shift=1, masks=True)
    runs.add("bracket-miss", tensors, [total // 2], masks=True)
    ties = torch.randn(20_000, generator=g)
    ties[::5] = 1.0
    ties[1::5] = 1.0
    runs.add("bracket", [ties], [int((ties > 1.0).sum()) + 1], masks=True)  # overflows its buffer
    tied = torch.randint(0, 1000, (20_000,), generator=g).float()  # ~20 ties at any threshold, buffered
    for k in (7_777, 10_001):
        runs.add("bracket", [tied], [k], masks=True)
        runs.add("bracket", [torch.sort(tied).values], [k], masks=True)  # ties next to each other
    big = torch.randn(100_000, generator=g)
    for hint in _hints(big, 40_000):  # buffers finished by several blocks
        runs.add("bracket", [big], [40_000], hint, masks=True)
    paths = runs.run(harness, tmp_path)
    assert {SINGLE, BUFFERED, MISSED, OVERFLOWED} <= paths["bracket"]


THRESHOLD_NOT_FINITE = "threshold contains non-finite values (NaN or inf)"  # csrc/cuda/device_check.cuh
KEEP_MESSAGES = {0: None, 1: NOT_FINITE, 2: THRESHOLD_NOT_FINITE}  # the harness's message codes (run_keep)


def _run_keep(harness, tmp_path, cases):
    """keep_mask_kernel alone (harness "keep" mode) on ``cases`` of (scores, thr, cut, offset,
    check_finite): per case (failed device checks, the last failure's message, the mask)."""
    words = [len(cases)]
    for scores, thr, cut, offset, check in cases:
        words += [8 * scores.dtype.itemsize, INF_BITS[scores.dtype], int(check), Runs._bits(thr.reshape(1))[0], cut,
                  offset, scores.numel(), *Runs._bits(scores)]
    (tmp_path / "keep.bin").write_bytes(torch.tensor(words, dtype=torch.int64).numpy().tobytes())
    done = subprocess.run([str(harness), "keep", str(tmp_path / "keep.bin"), str(tmp_path / "out.bin")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "GUARD" not in done.stdout, done.stdout[-4000:]  # a write past an array's end (harness.cpp)
    got = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.int64)
    results, at = [], 0
    for scores, *_ in cases:
        failed, message = got[at:at + 2].tolist()
        results.append((failed, KEEP_MESSAGES[message], got[at + 2:at + 2 + scores.numel()].reshape(scores.shape)))
        at += 2 + scores.numel()
    assert at == got.numel()
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_keep_mask_checks_scores_and_thr_when_asked(harness, tmp_path, dtype):
    """keep_mask's check_finite (a module's threshold in "keep" mask mode): with it, a NaN / +-inf
    score (first, last, in the second block of 256 threads) fails the scores' device check and a
    non-finite thr the threshold's;
    finite scores (+-max, -0.0) never fail; without it nothing fails. The mask is the reference's
    bit for bit whenever the scores are finite (also offsets and cuts inside the tensor)."""
    g = torch.Generator().manual_seed(31)
    n = 700  # 3 blocks of 256 threads, the last partial
    x = torch.randn(n, generator=g).to(dtype)
    info = torch.finfo(dtype)
    x[:3] = torch.tensor([info.max, -info.max, -0.0], dtype=dtype)
    x[100:140] = 0.25  # ties at the threshold below, split by the cut
    thr, keep_all = torch.tensor(0.25, dtype=dtype), 2**62
    cases = []
    for check in (False, True):
        for cut, offset in ((keep_all, 0), (120, 0), (1000 + 115, 1000), (0, 0)):
            cases.append((x, thr, cut, offset, check))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in (0, n - 1, 300):
            y = x.clone()
            y[pos] = bad
            cases += [(y, thr, keep_all, 0, True), (y, thr, keep_all, 0, False)]
        cases += [(x, torch.tensor(bad, dtype=dtype), keep_all, 0, True),
                  (x, torch.tensor(bad, dtype=dtype), keep_all, 0, False)]
    results = _run_keep(harness, tmp_path, cases)
    for i, ((scores, t, cut, offset, check), (failed, message, mask)) in enumerate(zip(cases, results)):
        finite = bool(torch.isfinite(scores).all() and torch.isfinite(t))
        want = None if finite or not check else (THRESHOLD_NOT_FINITE if not torch.isfinite(t) else NOT_FINITE)
        assert (failed > 0, message) == (want is not None, want), (i, failed, message)
        if finite:
            expect = ref.keep_mask(scores, t, torch.tensor(cut), offset)
            assert torch.equal(mask.bool(), expect) and int(mask.max()) <= 1, (i, "mask")


def test_tie_cut_in_a_problem_of_more_than_512_chunks(harness, tmp_path):
    """cut_from_chunks scans a problem's per-chunk tie counts kThreads (512) chunks at a time: a tie
    cut past the first 512 chunks (8 M scores) needs the counts of the earlier rounds. All-equal
    scores under a hint at their value: a single-value bracket (the fused pass only counts, which the
    emulation runs fast), its cut from the chunk counts, in chunk 512."""
    n = 512 * 16_384 + 3_000
    x = torch.zeros(n, dtype=torch.float16)
    runs = Runs()
    runs.add("bracket", [x], [n - 5], torch.tensor(0.0, dtype=torch.float16))
    assert runs.run(harness, tmp_path) == {"bracket": {SINGLE}}


def test_blocks_in_reverse_order(harness, tmp_path):
    """The kernels with every launch's blocks in the reverse order (emu.h: EMU_REVERSE_BLOCKS): the
    last ticket of a problem no longer goes to its highest block, the block that reads a compacted
    buffer (the problem's first) runs after the others, finishing blocks beyond a small buffer's
    first. Lists over several chunks, batches, hints, ties at the threshold, overflowed buffers,
    buffers finished by several blocks, topk_keep_mask's masks."""
    runs = Runs()
    g = torch.Generator().manual_seed(21)
    tensors = [torch.randn(20_000, generator=g), torch.randint(0, 3, (7,), generator=g).float(), torch.zeros(5),
               torch.randn(17_000, generator=g)[1:]]
    total = sum(t.numel() for t in tensors)
    for algo in ALGOS:
        for k in (1, total // 3):
            runs.add(algo, tensors, [k])
        runs.add(algo, tensors[:2] + tensors[3:], [5, 3, 900])
    ties = torch.randn(40_000, generator=g)
    ties[::5] = 0.3
    above = int((ties > 0.3).sum())
    for algo in ALGOS:
        runs.add(algo, [ties], [above + 7], torch.tensor(0.3))
        runs.add(algo, [ties], [above + 7])
    x = torch.randn(60_000, generator=g)
    for hint in _hints(x, 20_000):  # a small buffer in two finishing blocks' worth of room
        runs.add("bracket", [x], [20_000], hint, masks=True)
        runs.add("radix", [x], [20_000], hint)
    runs.run(harness, tmp_path, env=dict(os.environ, EMU_REVERSE_BLOCKS="1"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_ties_at_chunk_and_tensor_starts_with_masks(harness, tmp_path, dtype):
    """Ties of the threshold at the first entry of a chunk (flat index 16384) and of a list's second
    tensor, the cut before, at and after them: the chunk of a flat index (chunk_of's binary search:
    a start belongs to its own chunk) in the finishing tie counts and topk_keep_mask's buffered
    entries; tied lists on the single-value, missed and overflowed paths (their masks cut by flat
    index across tensors); 16-bit scores in 128-bit loads (their index order within a load)."""
    g = torch.Generator().manual_seed(23)
    runs = Runs()
    x = torch.randn(40_000, generator=g).to(dtype)
    t = torch.sort(x, descending=True).values[15_000]
    x[[3, 16_384, 30_000]] = t
    head = torch.randn(7, generator=g).to(dtype)
    tail = torch.randn(20_000, generator=g).to(dtype)
    tail[[0, 9]] = t
    head[2] = t
    for tensors in ([x], [head, tail]):
        flat = torch.cat([u.reshape(-1) for u in tensors])
        above = int((flat > t).sum())
        for k in range(above + 1, above + int((flat == t).sum()) + 1):
            for algo in ("bracket", "bracket-miss", "bracket-overflow"):
                runs.add(algo, tensors, [k], masks=True)
            runs.add("radix", tensors, [k])
    tied = [torch.zeros(300, dtype=dtype), torch.full((50,), -0.0, dtype=dtype), torch.zeros(20_000, dtype=dtype)]
    for k in (1, 320, 10_000):
        for algo in ("bracket", "bracket-miss", "bracket-overflow"):
            runs.add(algo, tied, [k], masks=True)
    paths = runs.run(harness, tmp_path)
    assert {SINGLE, BUFFERED} <= paths["bracket"]
