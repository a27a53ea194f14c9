"""benchmarks/bench_official.py without the official code: it skips, and its loader covers a split."""

import importlib.util
from pathlib import Path

import torch

from bise.data.types import Split

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_official.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_official", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_the_official_code_it_says_so_in_one_line_and_exits_0(tmp_path, capsys, monkeypatch):
    bench = _load()
    monkeypatch.delenv("BISE_OFFICIAL_DIR", raising=False)
    for argv in ([], ["--official-dir", str(tmp_path)]):  # none given; a folder without src/
        assert bench.main(argv) == 0
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and "official code not found" in out and "skipped" in out


def test_batches_cover_the_split_once_per_epoch_in_a_seeded_order():
    bench = _load()
    n = 23
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()  # image i is all i
    split = Split(x, torch.arange(n) % 10, (torch.arange(n) + 1) % 10)
    first, again = bench.Batches(split, 5), bench.Batches(split, 5)
    epochs = [list(first), list(first)]
    assert len(first) == 5 and [len(b[1]) for b in epochs[0]] == [5, 5, 5, 5, 3]
    for batches in epochs:
        index = torch.cat([b[0] for b in batches]).mul(255).round().long()[:, 0, 0, 0]
        assert sorted(index.tolist()) == list(range(n))  # every sample once, as x / 255
        assert torch.equal(torch.cat([b[1] for b in batches]), index % 10)  # x, y and b stay together
        assert torch.equal(torch.cat([b[2] for b in batches]), (index + 1) % 10)
    assert not torch.equal(torch.cat([b[1] for b in epochs[0]]), torch.cat([b[1] for b in epochs[1]]))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(list(again), epochs[0]))  # same seed, same order
    fixed = bench.Batches(split, 5, shuffle=False)
    assert torch.equal(torch.cat([b[1] for b in fixed]), split.y)
