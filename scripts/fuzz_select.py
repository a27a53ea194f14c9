#!/usr/bin/env python
"""Differential fuzzing of the selection and mask kernels against the reference backend.

A tool, not run in CI. Random cases are drawn around the size regimes and boundaries of the
kernels (csrc/cpu/select.cpp: kBlock = 4096, kSmall = 32768, the 1 M per-thread chunks, the
compaction limit n / 8; csrc/cpu/masked.cpp: the tie cut splitting 32768-element grains; the
Triton select's 128-element chunks and 16-entry buffer under the interpreter; the CUDA selects'
16384-element chunks through the emulator tests/kernels/select_cuda_emu), with lists split at
block and chunk edges, k at its ends and at tie runs, good / stale / far / tied / +-0.0 / NaN
hints, heavy ties, signed zeros, subnormals, extremes, sorted runs, every dtype and 1 to 3
threads. Each result is compared with bise_kernels/backends/reference.py bit for bit (thr bits,
cut, masks, W_eff); NaN / inf scores must raise a ValueError. A mismatch prints the case and
``--replay SEED:INDEX`` to rerun it alone (the cases depend on the seed and index only).

    nice -n 10 env OMP_NUM_THREADS=2 python scripts/fuzz_select.py --seconds 600 --seed 1
    python scripts/fuzz_select.py --replay 1:123

Run from the repository root (the in-place build of the extension). ``--targets`` picks from
cpp, masked, triton (TRITON_INTERPRET=1, tiny sizes only) and emu (the CUDA emulation, needs g++).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before bise_kernels: the Triton backend on CPU tensors

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "kernels")]

from bise_kernels.backends import BACKENDS  # noqa: E402
from bise_kernels.backends import reference as ref  # noqa: E402
from _select_cases import INT_OF_WIDTH, bits  # noqa: E402  (tests/kernels: raw bit patterns, -0.0 != +0.0)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
K_BLOCK, K_SMALL, PER_THREAD, GRAIN = 4096, 1 << 15, 128 * 4096, 32768
TRITON_CHUNK, EMU_CHUNK = 128, 16384
DELTAS = [0, 1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129]


class Mismatch(AssertionError):
    pass


def same(got, want, what):
    if isinstance(got, (list, tuple)):
        if len(got) != len(want):
            raise Mismatch(f"{what}: {len(got)} results, want {len(want)}")
        for i, (a, b) in enumerate(zip(got, want)):
            same(a, b, f"{what}[{i}]")
        return
    if got.dtype != want.dtype or got.shape != want.shape:
        raise Mismatch(f"{what}: dtype/shape {got.dtype} {tuple(got.shape)}, want {want.dtype} {tuple(want.shape)}")
    g, w = (bits(got), bits(want)) if got.is_floating_point() else (got, want)
    g, w = g.reshape(-1), w.reshape(-1)
    if not torch.equal(g, w):
        bad = (g != w).nonzero().reshape(-1)
        i = int(bad[0])
        raise Mismatch(f"{what}: {bad.numel()} differ, first at {i}: got {got.reshape(-1)[i].item()!r}, "
                       f"want {want.reshape(-1)[i].item()!r}")


# ----------------------------------------------------------------------------- case generation


def near(r: random.Random, base: int) -> int:
    return max(1, base + r.choice([-1, 1]) * (r.choice(DELTAS) if r.random() < 0.8 else r.randrange(1, 5000)))


def draw_size(r: random.Random, regime: str) -> int:
    if regime == "tiny":
        return r.randint(1, 300)
    if regime == "triton":
        return r.choice([r.randint(1, 600), near(r, TRITON_CHUNK * r.randint(1, 8))])
    if regime == "block":
        return near(r, K_BLOCK * r.randint(1, 8))
    if regime == "small":
        return near(r, r.choice([K_SMALL, K_SMALL + K_BLOCK, 2 * K_SMALL, 8 * K_SMALL // 7, K_SMALL * 3 // 2]))
    if regime == "emu":
        return r.choice([r.randint(1, 3000), near(r, EMU_CHUNK * r.randint(1, 3)), near(r, K_BLOCK * r.randint(1, 6))])
    if regime == "mid":
        return r.randint(2 * K_SMALL, 400_000)
    if regime == "chunks":  # several chunks per pass: 1 M per thread (2 and 3 threads), keep_mask's 1 M grain
        return near(r, r.choice([PER_THREAD * 2, PER_THREAD * 3, 1 << 20, PER_THREAD * 4]))
    raise ValueError(regime)


def split_points(r: random.Random, n: int, unit: int) -> list[int]:
    """Interior cut points of a list: at multiples of ``unit`` (block / chunk edges) +- a little, or random."""
    pieces = r.randint(2, 6) if r.random() < 0.85 else r.randint(7, 200)  # or many small pieces
    cuts = set()
    for _ in range(pieces - 1):
        if r.random() < 0.6 and n > unit:
            at = unit * r.randint(1, n // unit) + r.choice([0, 0, 1, -1, 2, -2, 16, -16])
        elif r.random() < 0.3:
            at = r.choice([1, n - 1])
        else:
            at = r.randint(1, max(1, n - 1))
        if 0 < at < n:
            cuts.add(at)
    return sorted(cuts)


def special_values(dtype: torch.dtype) -> torch.Tensor:
    f = torch.finfo(dtype)
    return torch.tensor([0.0, -0.0, f.max, -f.max, f.tiny, -f.tiny, f.tiny * f.eps, -f.tiny * f.eps, 1.0, -1.0,
                         f.eps, 1 + f.eps], dtype=torch.float64).to(dtype)


def draw_values(r: random.Random, g: torch.Generator, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, str]:
    dist = r.choice(["randn", "few", "few", "equal", "sorted", "reversed", "zeros", "subnormal", "extremes",
                     "bits", "narrow", "plateau", "mixed", "int"])
    f = torch.finfo(dtype)
    if dist == "randn":
        x = torch.randn(n, generator=g, dtype=torch.float64) * 10 ** r.uniform(-3, 3)
    elif dist == "few":
        vals = torch.randn(r.choice([1, 2, 3, 5, 17]), generator=g, dtype=torch.float64)
        x = vals[torch.randint(0, vals.numel(), (n,), generator=g)]
    elif dist == "equal":
        x = torch.full((n,), r.choice([0.0, -0.0, 1.5, -2.0, f.max, -f.max, f.tiny]), dtype=torch.float64)
    elif dist in ("sorted", "reversed"):
        x = torch.sort(torch.randn(n, generator=g, dtype=torch.float64), descending=dist == "reversed").values
        if r.random() < 0.5:
            x = torch.round(x * 4) / 4  # sorted runs of ties
    elif dist == "zeros":  # mixed signs with -0.0
        x = torch.randn(n, generator=g, dtype=torch.float64)
        z = torch.rand(n, generator=g) < r.random()
        x[z] = torch.where(torch.rand(int(z.sum()), generator=g) < 0.5, -0.0, 0.0).double()
    elif dist == "subnormal":
        x = torch.randint(-20, 21, (n,), generator=g).double() * (f.tiny * f.eps)
    elif dist == "extremes":
        sp = special_values(dtype).double()
        x = sp[torch.randint(0, sp.numel(), (n,), generator=g)]
    elif dist == "bits":  # random finite bit patterns (every exponent)
        w = f.bits
        raw = torch.randint(-(2 ** (w - 1)), 2 ** (w - 1) - 1, (n,), generator=g, dtype=torch.int64)
        y = raw.to(INT_OF_WIDTH[w // 8]).view(dtype).double() if dtype != torch.float64 else raw.view(torch.float64)
        x = torch.where(torch.isfinite(y), y, torch.zeros_like(y))
    elif dist == "narrow":  # consecutive keys: a narrow key range, few bits to resolve
        base = bits(torch.tensor([r.uniform(-4, 4)], dtype=dtype)).to(torch.int64)
        steps = torch.randint(0, r.choice([2, 16, 300, 5000]), (n,), generator=g)
        y = (base + steps).to(INT_OF_WIDTH[dtype.itemsize]).view(dtype).double()
        x = torch.where(torch.isfinite(y), y, torch.zeros_like(y))
    elif dist == "plateau":  # a large tie run in the middle of random data
        x = torch.randn(n, generator=g, dtype=torch.float64)
        x[torch.rand(n, generator=g) < r.choice([0.05, 0.3, 0.6, 0.95])] = r.choice([0.0, 0.25, -1.0])
    elif dist == "int":
        x = torch.randint(-r.choice([1, 10, 1000]), r.choice([1, 10, 1000]) + 1, (n,), generator=g).double()
    else:  # "mixed": runs of the other kinds
        parts, left = [], n
        while left:
            m = min(left, r.choice([1, 7, 100, K_BLOCK, r.randint(1, max(1, n))]))
            parts.append(draw_values(r, g, m, dtype)[0].double())
            left -= m
        x = torch.cat(parts)
    y = x.to(dtype)
    if r.random() < 0.1 and n:  # a few specials anywhere
        sp = special_values(dtype)
        idx = torch.randint(0, n, (r.randint(1, 5),), generator=g)
        y[idx] = sp[torch.randint(0, sp.numel(), (idx.numel(),), generator=g)]
    return y, dist


def draw_k(r: random.Random, x: torch.Tensor) -> int:
    n = x.numel()
    pick = r.random()
    if pick < 0.35:
        return r.choice([1, 2, n - 1, n, n // 2, n - 2, 3]) if n > 3 else r.randint(1, n)
    if pick < 0.6:  # around a tie run: the first and last rank of a tied value
        v = x.reshape(-1)[r.randrange(n)]
        above = int((x > v).sum())
        ties = int((x == v).sum())
        return min(n, max(1, r.choice([above + 1, above + ties, above + ties + 1, above, above + ties // 2])))
    return r.randint(1, n)


def draw_hint(r: random.Random, x: torch.Tensor, k: int):
    """(hint or None, its kind)."""
    kind = r.choice(["none", "none", "exact", "up", "down", "stale", "far", "tie", "zero", "negzero", "nan", "inf",
                     "other_dtype"])
    flat = x.reshape(-1)
    order = torch.sort(flat, descending=True).values
    thr = order[k - 1]
    if kind == "none":
        return None, kind
    if kind == "exact":
        return thr.clone(), kind
    if kind in ("up", "down"):
        b = bits(thr.reshape(1)).clone()
        b += 1 if kind == "up" else -1
        h = b.view(x.dtype)[0]
        return (h if torch.isfinite(h) else thr.clone()), kind
    if kind == "stale":
        off = max(1, int(x.numel() * r.choice([0.001, 0.01, 0.1])))
        return order[min(x.numel() - 1, max(0, k - 1 + r.choice([-off, off])))].clone(), kind
    if kind == "far":
        return torch.tensor(r.choice([1e30, -1e30, 3.0e4, -6.0e4]), dtype=torch.float64).to(x.dtype).nan_to_num(), kind
    if kind == "tie":  # the most frequent value
        vals, counts = torch.unique(flat, return_counts=True)
        return vals[counts.argmax()].clone(), kind
    if kind in ("zero", "negzero"):
        return torch.tensor(0.0 if kind == "zero" else -0.0, dtype=x.dtype), kind
    if kind == "nan":
        return torch.tensor(float("nan"), dtype=x.dtype), kind
    if kind == "inf":
        return torch.tensor(r.choice([float("inf"), float("-inf")]), dtype=x.dtype), kind
    return thr.double() * (1 + 1e-9), kind  # a float64 hint


class Case:
    """One random case, a function of (seed, index) only."""

    def __init__(self, seed: int, index: int, target: str):
        self.seed, self.index, self.target = seed, index, target
        r = self.r = random.Random(f"{seed}:{index}:{target}")
        g = self.g = torch.Generator().manual_seed(r.randrange(2**62))
        regimes = {"cpp": (["tiny", "block", "small", "small", "mid", "chunks"], [3, 3, 4, 2, 2, 1]),
                   "masked": (["tiny", "block", "small"], [2, 3, 2]),
                   "triton": (["tiny", "triton"], [1, 2]),
                   "emu": (["emu"], [1])}[target]
        self.regime = r.choices(*regimes)[0]
        dtypes = DTYPES[:3] if target == "triton" else DTYPES
        self.dtype = r.choice(dtypes)
        self.n = draw_size(r, self.regime)
        self.x, self.dist = draw_values(r, g, self.n, self.dtype)
        unit = {"triton": TRITON_CHUNK, "emu": EMU_CHUNK}.get(target, r.choice([K_BLOCK, K_BLOCK, PER_THREAD]))
        self.splits = split_points(r, self.n, unit) if r.random() < 0.5 and self.n > 1 else []
        self.k = draw_k(r, self.x)
        self.hint, self.hint_kind = draw_hint(r, self.x, self.k)
        self.threads = r.choice([1, 2, 3])

    def pieces(self) -> list[torch.Tensor]:
        edges = [0, *self.splits, self.n]
        out = [self.x[a:b] for a, b in zip(edges, edges[1:])]
        if self.r.random() < 0.2:  # shapes and non-contiguous views of the same values
            out = [p.reshape(-1, 1) if p.numel() % 2 else p.reshape(2, -1).t().contiguous().t() for p in out]
        return out

    def describe(self) -> str:
        return (f"target={self.target} regime={self.regime} dtype={self.dtype} n={self.n} dist={self.dist} "
                f"splits={self.splits} k={self.k} hint={self.hint_kind}:{None if self.hint is None else self.hint.item()!r} "
                f"threads={self.threads}")


# ----------------------------------------------------------------------------- checks


def expect_value_error(fn, what):
    try:
        fn()
    except ValueError:
        return
    except Exception as exc:  # noqa: BLE001
        raise Mismatch(f"{what}: raised {type(exc).__name__}: {exc}, want ValueError") from exc
    raise Mismatch(f"{what}: no error, want ValueError")


def check_cpp(case: Case, kernels) -> None:
    r, pieces = case.r, case.pieces()
    flats = [p.reshape(-1) for p in pieces]
    want = ref.topk_select(pieces, case.k)
    same(kernels["topk_select"](pieces, case.k, case.hint), want, "topk_select")
    same(kernels["topk_keep_mask"](pieces, case.k, case.hint), ref.topk_keep_mask(pieces, case.k), "topk_keep_mask")
    thr, cut = want
    offset = 0
    for i, p in enumerate(pieces):  # keep_mask of each piece, the selection's thr / cut and random ones
        t = thr if r.random() < 0.5 else p.reshape(-1)[r.randrange(p.numel())].clone()
        c = cut if t is thr else torch.tensor(r.choice([0, ref.KEEP_ALL_TIES, offset + r.randint(-2, p.numel() + 2),
                                                         offset + GRAIN * r.randint(0, 3), offset + p.numel()]))
        check = r.random() < 0.5
        same(kernels["keep_mask"](p, t, c, offset, check), ref.keep_mask(p, t, c, offset), f"keep_mask[{i}]")
        offset += p.numel()
    ks = [draw_k(r, f) for f in flats]
    hints = None
    if r.random() < 0.5:
        drawn = [draw_hint(r, f, k)[0] for f, k in zip(flats, ks)]
        hints = torch.stack([(f[0] if h is None else h).to(case.dtype) for h, f in zip(drawn, flats)])
    same(kernels["batched_topk_select"](pieces, ks, hints), ref.batched_topk_select(pieces, ks), "batched_topk_select")
    if r.random() < 0.15:  # NaN / inf anywhere: every select and keep_mask(check_finite) refuse
        bad = [p.clone() for p in pieces]
        i = r.randrange(len(bad))
        f = bad[i].view(-1) if bad[i].is_contiguous() else None
        if f is not None:
            pos = r.choice([0, f.numel() - 1, r.randrange(f.numel()), min(f.numel() - 1, K_BLOCK * r.randint(0, 4))])
            f[pos] = r.choice([float("nan"), float("inf"), float("-inf")])
            k = r.randint(1, case.n)
            expect_value_error(lambda: kernels["topk_select"](bad, k, case.hint), "non-finite topk_select")
            expect_value_error(lambda: kernels["topk_keep_mask"](bad, k, case.hint), "non-finite topk_keep_mask")
            expect_value_error(lambda: kernels["batched_topk_select"](bad, [1] * len(bad), None),
                               "non-finite batched_topk_select")
            expect_value_error(lambda: kernels["keep_mask"](bad[i], thr, cut, 0, True), "non-finite keep_mask")
    if r.random() < 0.05:  # an empty tensor in a list: refused, naming it
        at = r.randint(0, len(pieces))
        listed = pieces[:at] + [case.x[:0]] + pieces[at:]
        expect_value_error(lambda: kernels["topk_select"](listed, 1, None), "empty tensor in a list")


def check_triton(case: Case, kernels) -> None:
    pieces = case.pieces()
    same(kernels["topk_select"](pieces, case.k, case.hint), ref.topk_select(pieces, case.k), "topk_select")
    ks = [draw_k(case.r, p.reshape(-1)) for p in pieces]
    same(kernels["batched_topk_select"](pieces, ks, None), ref.batched_topk_select(pieces, ks), "batched_topk_select")
    thr, cut = ref.topk_select(pieces, case.k)
    same(kernels["keep_mask"](pieces[0], thr, cut, 0, False), ref.keep_mask(pieces[0], thr, cut, 0), "keep_mask")


def check_masked(case: Case, kernels) -> None:
    """W_eff through the fused keep rule (split at the cut), weight-shaped and per-unit scores: the
    forward of masked_linear (both call the same dense op on W_eff), channel_gate and the keep variants."""
    r, n, dtype = case.r, case.n, case.dtype
    rows = r.choice([d for d in (1, 2, 3, 4, 7, 64, n) if n % d == 0])
    dtype = dtype if r.random() < 0.7 else r.choice(DTYPES)  # the weight's; the scores keep theirs
    weight = torch.randn(rows, n // rows, generator=case.g).to(dtype)
    for scores in (case.x.reshape(rows, -1), case.x[:rows].contiguous()):
        flat = scores.reshape(-1)
        k = draw_k(r, flat)
        thr, cut = ref.topk_select([scores], k)
        if r.random() < 0.3:  # any cut, also past the grain edges
            cut = torch.tensor(r.choice([0, ref.KEEP_ALL_TIES, r.randint(0, flat.numel()), GRAIN * r.randint(1, 3) +
                                         r.randint(-2, 2)]))
        x = torch.randn(3, weight.shape[1], generator=case.g).to(dtype)
        same(kernels["masked_linear_forward"](x, weight, None, scores, thr, cut),
             ref.masked_linear_forward(x, weight, None, scores, thr, cut), "masked_linear_forward")
        grad_y = torch.randn(3, rows, generator=case.g).to(dtype)
        needs = (False, True, False, False)  # the weight gradient: grad_W_eff masked in place by the rule
        same(kernels["masked_linear_backward"](grad_y, x, weight, scores, thr, cut, "ste", 1.0, needs)[1],
             ref.masked_linear_backward(grad_y, x, weight, scores, thr, cut, "ste", 1.0, needs)[1],
             "masked_linear_backward grad_weight")
        keep = ref.keep_mask(scores, thr, cut)
        same(kernels["masked_linear_keep_forward"](x, weight, None, keep),
             ref.masked_linear_keep_forward(x, weight, None, keep), "masked_linear_keep_forward")
        if scores.dim() == 1:
            y = torch.randn(2, rows, 3, generator=case.g).to(dtype)
            same(kernels["channel_gate_forward"](y, scores, thr, cut, 1),
                 ref.channel_gate_forward(y, scores, thr, cut, 1), "channel_gate_forward")


# ----------------------------------------------------------------------------- the CUDA emulation


class Emu:
    """Cases for the CUDA selects' emulation, run by the harness in batches (a harness call is a
    process start); a failed batch is rerun case by case to name the case."""

    def __init__(self):
        import test_select_cuda_emulated as emu

        self.emu = emu
        self.dir = Path(tempfile.mkdtemp(prefix="fuzz_select_emu_"))
        (self.dir / "build").mkdir()
        self.binary = emu.build_harness(self.dir / "build")
        self.paths: set[tuple[str, int]] = set()  # (algorithm, bracket outcome) pairs the batches took

    def add(self, runs, case: Case) -> None:
        r, pieces = case.r, [p.reshape(-1).contiguous() for p in case.pieces()]
        algo = r.choice(list(self.emu.ALGOS))
        runs.add(algo, pieces, [case.k], case.hint, shift=r.choice([0, 0, 1, 3]),
                 masks=algo != "radix" and r.random() < 0.5)
        ks = [draw_k(r, p) for p in pieces]
        if len(pieces) > 1:
            runs.add(algo, pieces, ks, torch.stack([p[0] for p in pieces]) if r.random() < 0.5 else None)

    def run(self, cases: list[Case]) -> list[tuple[Case, str]]:
        runs = self.emu.Runs()
        for case in cases:
            self.add(runs, case)
        try:
            for algo, paths in runs.run(self.binary, self.dir).items():
                self.paths.update((algo, path) for path in paths)
            return []
        except AssertionError:
            if len(cases) == 1:
                return [(cases[0], traceback.format_exc(limit=1))]
        failed = []
        for case in cases:  # again, one by one, from the same draws
            failed += self.run([Case(case.seed, case.index, "emu")])
        return failed


# ----------------------------------------------------------------------------- driver


def kernels_of(backend: str) -> dict:
    table = BACKENDS[backend].kernels()
    if not table:
        sys.exit(f"backend {backend!r} unavailable: {BACKENDS[backend].why_unavailable}")
    return table


def run_one(case: Case, tables: dict) -> None:
    torch.set_num_threads(case.threads)
    if case.target == "cpp":
        check_cpp(case, tables["cpp"])
    elif case.target == "masked":
        check_masked(case, tables["cpp"])
    elif case.target == "triton":
        check_triton(case, tables["triton"])


def report(case: Case, error: str) -> None:
    print(f"MISMATCH {case.describe()}\n  {error.strip()}\n  reproduce: python scripts/fuzz_select.py "
          f"--replay {case.seed}:{case.index} --targets {case.target}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="cpp,masked,triton,emu")
    ap.add_argument("--replay", help="SEED:INDEX of one case (with --targets naming its target)")
    args = ap.parse_args()
    targets = args.targets.split(",")
    tables = {"cpp": kernels_of("cpp")} if {"cpp", "masked"} & set(targets) else {}
    if "triton" in targets:
        tables["triton"] = kernels_of("triton")
    emu = Emu() if "emu" in targets else None
    if args.replay:
        seed, index = map(int, args.replay.split(":"))
        for target in targets:
            case = Case(seed, index, target)
            print(case.describe())
            if target == "emu":
                for c, error in emu.run([case]):
                    report(c, error)
            else:
                run_one(case, tables)
        print("done")
        return 0
    # Weights: the cost per case differs by orders of magnitude (a Triton case under the interpreter
    # ~1 s, an emulated batch ~ seconds, a cpp case ~ms to 0.3 s).
    weights = {"cpp": 10, "masked": 3, "triton": 1, "emu": 1}
    chooser = random.Random(args.seed)
    counts, regimes, failures = Counter(), Counter(), 0
    emu_batch: list[Case] = []
    start = time.monotonic()
    index, shown = 0, start
    while time.monotonic() - start < args.seconds:
        if time.monotonic() - shown > 300:
            shown = time.monotonic()
            print(f"{shown - start:.0f} s: {index} cases, {failures} failed, {dict(counts)}", flush=True)
        target = chooser.choices(targets, [weights[t] for t in targets])[0]
        case = Case(args.seed, index, target)
        index += 1
        counts[target] += 1
        regimes[(target, case.regime, str(case.dtype).split(".")[1])] += 1
        if target == "emu":
            emu_batch.append(case)
            if len(emu_batch) == 25:
                for c, error in emu.run(emu_batch):
                    failures += 1
                    report(c, error)
                emu_batch = []
            continue
        try:
            run_one(case, tables)
        except Exception:  # noqa: BLE001 - a crash is a finding too
            failures += 1
            report(case, traceback.format_exc(limit=2))
    if emu_batch:
        for c, error in emu.run(emu_batch):
            failures += 1
            report(c, error)
    print(f"seed {args.seed}: {index} cases in {time.monotonic() - start:.0f} s, {failures} failed; per target "
          f"{dict(counts)}")
    if emu is not None:
        print(f"  emulation (algorithm, outcome: 0 missed 1 single 2 buffered 3 overflowed): {sorted(emu.paths)}")
    for key, count in sorted(regimes.items()):
        print(f"  {key[0]:7s} {key[1]:7s} {key[2]:9s} {count}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
