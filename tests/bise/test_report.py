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


def test_headline_is_the_pattern_average_for_two_bias_data():
    from bise.report import headline

    assert headline(_report()) == ("unbiased", "unbiased_accuracy")
    report = _report(two_bias=True)
    assert headline(report) == ("unbiased (mean of the 4 alignment patterns)", "pattern_average")
    report["vanilla"]["test"]["patterns"]["conflicting/conflicting"] = None  # no test sample of one pattern
    assert headline(report) == ("unbiased (mean of the 3 alignment patterns with test samples)", "pattern_average")
    text = render_markdown(_report(two_bias=True))
    assert "**Test accuracy, unbiased (mean of the 4 alignment patterns):**" in text


def test_class_by_pattern_names_each_side_against_the_target():
    from bise.report import _class_by_pattern

    groups = {"y=0,b=0/0": 1.0, "y=0,b=0/1": 0.5, "y=0,b=2/1": 0.25, "y=0,b=1/0": 0.0, "y=1,b=0/0": 0.75,
              "y=1,b=1/1": None}
    assert _class_by_pattern(groups) == {
        0: {"aligned/aligned": 1.0, "aligned/conflicting": 0.5, "conflicting/aligned": 0.0,
            "conflicting/conflicting": 0.25},
        1: {"conflicting/conflicting": 0.75}}  # a group without test samples (None) is left out


def test_model_section_scores_the_metrics_model_and_costs_the_model():
    torch.manual_seed(0)
    small, big = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Linear(3, 2))
    data = _Data()
    from bise.evaluate import evaluate

    sec = model_section(small, data, metrics_model=big, vanilla_params=20, units_pruned=0.5)
    assert sec["test"] == evaluate(big, data)["test"] != evaluate(small, data)["test"]
    assert sec["params"] == 10 and sec["weights_removed"] == 0.5


def test_markdown_has_a_val_table_and_a_group_table_up_to_24_groups():
    text = render_markdown(_report())
    assert "## test split" in text and "## val split" in text
    val = text.split("## val split\n", 1)[1].split("\n## ", 1)[0]
    assert "| subnetwork | 75.0 |" in val

    def groups_report(n):
        y, b = torch.arange(n) // 6, torch.arange(n) % 6  # n (y, b) groups of one sample each
        m = metrics_from_predictions(y, y, b)
        assert len(m["groups"]) == n
        return build_report(vanilla={"test": m, "mmacs": 1.0, "params": 1}, subnetwork={"test": m, "mmacs": 1.0,
                            "params": 1}, export={"max_abs_diff": 0.0}, config={}, timing={})

    assert "| group | vanilla | subnetwork |" in render_markdown(groups_report(24))  # MANY_GROUPS: still a table
    assert "Heatmaps in group_accuracy.png" in render_markdown(groups_report(30))


def test_temperature_steps_are_the_epochs_after_a_halving():
    from bise.report import _temperature_steps

    history = [{"epoch": e, "temperature": t} for e, t in zip(range(1, 6), (1.0, 1.0, 0.5, 0.5, 0.25))]
    assert _temperature_steps(history) == [2, 4]


def test_write_report_lists_only_the_plots_it_wrote(tmp_path):
    """A history without per-epoch metrics draws no accuracy plot: its path is not returned (the CLI
    records every returned path in run.json)."""
    paths = write_report(str(tmp_path), _report(), history=[{"epoch": 1, "temperature": 1.0, "val": None}])
    assert all(os.path.isfile(p) for p in paths)
    assert str(tmp_path / PLOTS[0]) not in paths and not (tmp_path / PLOTS[0]).exists()


def test_group_plots_take_groups_without_samples_and_the_matrix_is_y_by_b(tmp_path):
    from bise.report import _group_matrix, plot_groups

    matrix = _group_matrix({"y=0,b=1": 0.5, "y=2,b=0": 1.0, "y=1,b=1": None})
    assert matrix.shape == (3, 2) and matrix[0, 1] == 0.5 and matrix[2, 0] == 1.0
    assert all(matrix[i, j] != matrix[i, j] for i, j in ((0, 0), (1, 1), (1, 0), (2, 1)))  # NaN: absent or None
    report = _report()
    report["subnetwork"] = dict(report["subnetwork"], test=dict(report["subnetwork"]["test"]))
    report["subnetwork"]["test"]["groups"] = dict(report["subnetwork"]["test"]["groups"], **{"y=0,b=0": None})
    plot_groups(report, str(tmp_path / "g.png"))  # a group without test samples: no bar, not a crash
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_vanilla_lines_state_the_fit_and_the_problems():
    report = _report()
    health = {"train_accuracy": 0.9, "chance": 0.1, "aligned_train_accuracy": 0.95, "n_conflicting_train": 25,
              "n_train": 200, "conflicting_train_accuracy": 0.5, "units": 300, "dead_units": 3, "problems": []}
    report["config"]["vanilla"] = {"epochs": 3, "lr": 0.001, "batch_size": 256, "seed": 0, "health": health}
    text = render_markdown(report)
    assert "25 bias-conflicting of 200 training samples (12.5%), of which it fits 50.0%" in text
    assert "did not train" not in text
    health["problems"] = ["training accuracy 0.1 is below 0.55"]
    assert "**The vanilla model did not train:** training accuracy 0.1 is below 0.55." in render_markdown(report)


def test_history_plot_marks_the_halvings_and_the_selected_epoch(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    lines, real = [], Axes.axvline
    monkeypatch.setattr(Axes, "axvline", lambda self, x=0, *a, **k: (lines.append((x, k.get("label"))),
                                                                     real(self, x, *a, **k))[1])
    history = [{"epoch": e, "temperature": t, "val": _metrics()} for e, t in zip(range(1, 6), (1, 1, .5, .5, .25))]
    assert plot_history(history, str(tmp_path / "h.png"), selected_epoch=3)
    assert lines == [(2, "temperature halved"), (4, None), (3, "selected epoch (3)")]
