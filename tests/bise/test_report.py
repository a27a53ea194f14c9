"""report.json key structure, report.md tables, plots, atomic writes."""

import json
import os

import pytest
import torch
from torch import nn

from bise.evaluate import metrics_from_predictions
from bise.report import (PLOTS, atomic_write, build_report, model_section, plot_history, render_markdown,
                         write_report)


def _metrics(two_bias=False):
    y = torch.tensor([0, 1, 1, 0])
    b = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]]) if two_bias else torch.tensor([0, 1, 0, 1])
    return metrics_from_predictions(torch.tensor([0, 1, 0, 0]), y, b)


def _section(two_bias=False, **extra):
    return {"test": _metrics(two_bias), "val": _metrics(two_bias), "mmacs": 1.5, "params": 100, **extra}


def _report(finetuned=True, two_bias=False):
    sub = _section(two_bias, units_pruned=0.25, weights_removed=0.4)
    return build_report(vanilla=_section(two_bias), subnetwork=sub, finetuned=sub if finetuned else None,
                        export={"max_abs_diff": 1e-7},
                        config={"data": {"spec": "colored-digits"}, "arch": "mlp", "seed": 0},
                        timing={"extraction_seconds": 2.0,
                                "latency_seconds": {"vanilla": {"batch_1": 1e-3, "batch_256": 2e-2}}})


def test_key_order_and_optional_finetuned():
    assert list(_report()) == ["vanilla", "subnetwork", "finetuned", "export", "config", "timing"]
    assert list(_report(finetuned=False)) == ["vanilla", "subnetwork", "export", "config", "timing"]


def test_markdown_tables():
    text = render_markdown(_report(two_bias=True), units={"features.relu1": (3, 10)})
    assert "| subnetwork | 75.0 | 100.0 | 66.7 | 75.0 | 0.0 |" in text  # two-bias: aligned = both agree
    assert "| aligned/aligned | aligned/conflicting | conflicting/aligned | conflicting/conflicting |" in text
    assert "| features.relu1 | 3 | 10 |" in text
    assert "| vanilla | 1.000 | 20.000 |" in text
    assert "| extraction_seconds | 2.00 |" in text


def test_write_report_files_and_history_plot(tmp_path):
    history = [{"epoch": e, "temperature": 0.5 ** ((e - 1) // 2), "val": _metrics()} for e in range(1, 6)]
    paths = write_report(str(tmp_path), _report(), history=history, units={"a": (1, 2), "b": (2, 2)})
    assert sorted(os.path.basename(p) for p in paths) == sorted(["report.json", "report.md", *PLOTS])
    for p in paths:
        assert os.path.getsize(p) > 0
    assert json.loads((tmp_path / "report.json").read_text())["export"]["max_abs_diff"] == 1e-7
    assert (tmp_path / PLOTS[0]).read_bytes()[:4] == b"\x89PNG"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert not plot_history([{"epoch": 1, "temperature": 1.0, "val": None}], str(tmp_path / "none.png"))
    with pytest.raises(ValueError, match="lacks the sections"):
        write_report(str(tmp_path), {"vanilla": {}})


def test_many_groups_heatmap(tmp_path):
    y = torch.arange(100) // 10
    b = torch.arange(100) % 10
    m = metrics_from_predictions(y, y, b)
    report = build_report(vanilla={"test": m, "mmacs": 1.0, "params": 1}, subnetwork={"test": m, "mmacs": 1.0,
                          "params": 1}, export={"max_abs_diff": 0.0}, config={}, timing={})
    write_report(str(tmp_path), report)
    assert (tmp_path / PLOTS[2]).is_file() and not (tmp_path / PLOTS[0]).exists()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def failing(tmp):
        open(tmp, "w").write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(str(path), failing)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_every_report_file_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    """report.json, report.md and the plots were renamed into place unsynced (docs/cli.md: temporary file,
    fsync, rename): a crash could leave an empty or partial file that run.json's hash then calls changed."""
    import bise.checkpoint

    synced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(bise.checkpoint.os, "replace", lambda a, b: (replaced.append((str(a), str(b))),
                                                                     real_replace(a, b)))
    paths = write_report(str(tmp_path), _report(), history=[{"epoch": 1, "temperature": 1.0, "val": _metrics()}],
                         units={"a": (1, 2)})
    assert sorted(b for _, b in replaced) == sorted(paths) and len(paths) == 5
    assert all(a in synced for a, _ in replaced)


class _Split:
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, 2, 2, generator=g)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.b = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def inputs(self, index=None):
        return self.x if index is None else self.x[index]


class _Data:
    input_shape = (1, 2, 2)
    val = None

    def __init__(self):
        self.test = _Split(20)


def test_model_section():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    sec = model_section(model, _Data(), vanilla_params=20, units_pruned=0.5)
    assert list(sec) == ["test", "mmacs", "params", "units_pruned", "weights_removed"]
    assert sec["params"] == 10 and sec["weights_removed"] == 0.5 and sec["mmacs"] == pytest.approx(8e-6)


def test_protocol_names_the_options_that_change_the_masks():
    report = _report()
    report["config"].update(vanilla={"from": "/m.pt"}, extraction={
        "mask_epochs": 3, "head_epochs": 1, "budget": 0.25, "reweight": False, "mi": False, "label_free": True,
        "amp": True, "result": {"mask_set": "vanilla-train", "batch_size": 64, "selection": "last epoch"}})
    text = render_markdown(report)
    protocol = text.split("## Protocol\n", 1)[1].split("\n## ", 1)[0]
    for needle in ("vanilla-train set (batch size 64)", "3 mask epochs, 1 head epochs", "loss: plain cross-entropy;",
                   "pseudo (label-free)", "the top 25% of units", "selection: last epoch", "bf16 autocast"):
        assert needle in protocol, needle
    assert "from --model /m.pt" in text and "not measured" in text
