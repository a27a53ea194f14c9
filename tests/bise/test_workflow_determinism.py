"""Reproducibility of the workflow (docs/ops.md, "Determinism"): the same seed twice in one process
gives the same masks, scores, weights and metrics, bit for bit, with torch.use_deterministic_algorithms
on (the whole `bise run`, not only the extraction, which turns it on itself: ExtractConfig.deterministic)
or off."""

import contextlib
import dataclasses
import json

import torch

from bise.cli import main
from bise.extract import ExtractConfig, extract
from bise.train import train_vanilla

TINY = ["--data", "colored-digits", "--arch", "mlp", "--vanilla-epochs", "2", "--mask-epochs", "2",
        "--head-epochs", "1", "--finetune-epochs", "1", "--latency-repeats", "1", "--quiet"]


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _timeless(value):
    """A report without what differs between runs by nature: durations and the run's own paths."""
    if isinstance(value, dict):
        return {k: _timeless(v) for k, v in value.items()
                if "seconds" not in k and k not in ("timing", "model", "from")}
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def _assert_equal(a, b, path="result"):
    """Tensors bit for bit (as bytes), anything else with ==, through dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8) if a.is_floating_point() else a,
                           b.reshape(-1).view(torch.uint8) if b.is_floating_point() else b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), path
        for k in a:
            _assert_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _run(out, deterministic):
    with deterministic_algorithms(deterministic):
        assert main(["run", *TINY, "--out", str(out)]) == 0
    load = lambda name: torch.load(out / name, weights_only=False)  # noqa: E731
    return _timeless({"report": json.loads((out / "report.json").read_text()), "masks": load("masks.pt"),
                      "vanilla": load("vanilla.pt"), "finetuned": load("finetuned.pt")})


def test_bise_run_twice_with_the_same_seed_is_bit_identical_in_and_out_of_deterministic_mode(tmp_path):
    first = _run(tmp_path / "a", True)
    _assert_equal(_run(tmp_path / "b", True), first)
    _assert_equal(_run(tmp_path / "c", False), first)
    # the pruned GEMMs round like the full ones on some CPUs only (oneDNN / MKL held to AVX2: 2.2e-8)
    assert first["report"]["export"]["max_abs_diff"] <= 1e-6


def test_extract_twice_with_the_same_seed_is_bit_identical(digits):
    data = dataclasses.replace(digits, train=digits.train.subset(torch.arange(300)))
    model = train_vanilla(data, "mlp", epochs=1, quiet=True)
    config = ExtractConfig(mask_epochs=2, head_epochs=1, batch_size=50)
    runs = [extract(model, data, config=config, quiet=True) for _ in range(2)]
    runs.append(extract(model, data, config=dataclasses.replace(config, deterministic=False), quiet=True))
    for other in runs[1:]:
        _assert_equal(other.masks, runs[0].masks, "masks")
        _assert_equal(other.scores, runs[0].scores, "scores")
        _assert_equal(_timeless(other.history), _timeless(runs[0].history), "history")
