"""Reports of two-bias data (1,000 groups) stay readable; the history plot marks what matters."""

import torch

from bise import report as report_mod
from bise.evaluate import metrics_from_predictions
from bise.report import build_report, headline, plot_groups, plot_history, render_markdown


def _two_bias_metrics(seed: int) -> dict:
    """Multi-Color MNIST-sized metrics: 10 classes x 10 x 10 bias colours = 1,000 groups."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(10).repeat_interleave(100).repeat(3)
    b = torch.stack([torch.arange(10).repeat(10).repeat_interleave(1).repeat(30),
                     torch.arange(10).repeat_interleave(10).repeat(30)], dim=1)
    pred = torch.where(torch.rand(len(y), generator=g) < 0.7, y, (y + 1) % 10)
    return metrics_from_predictions(pred, y, b)


def _report():
    sec = {"test": _two_bias_metrics(0), "mmacs": 1.0, "params": 10}
    sub = {"test": _two_bias_metrics(1), "mmacs": 0.5, "params": 5, "units_pruned": 0.5, "weights_removed": 0.5}
    return build_report(vanilla=sec, subnetwork=sub, export={"max_abs_diff": 0.0}, timing={},
                        config={"data": {"spec": "multicolor-mnist", "seed": 0}, "arch": "mlp"})


def test_two_bias_report_headlines_the_pattern_mean_and_stays_short():
    report = _report()
    assert len(report["vanilla"]["test"]["groups"]) == 1000
    assert headline(report) == ("unbiased (mean of the 4 alignment patterns)", "pattern_average")
    text = render_markdown(report)
    assert len(text.splitlines()) < 120
    mean = report["subnetwork"]["test"]["pattern_average"]
    assert f"subnetwork {100 * mean:.1f}" in text.split("\n\n")[2]  # the headline line, before the tables
    assert "| y | aligned/aligned | aligned/conflicting | conflicting/aligned | conflicting/conflicting |" in text


def test_a_pattern_without_test_samples_is_not_counted_in_the_headline_nor_drawn_at_zero(tmp_path, monkeypatch):
    """The headline said "mean of the 4 alignment patterns" where one had no test sample (a mean of 3),
    and the summary bars drew a metric without samples (None) as 0%."""
    report = _report()
    for name in ("vanilla", "subnetwork"):
        report[name]["test"]["patterns"]["conflicting/conflicting"] = None
        report[name]["test"]["worst_group_accuracy"] = None
    assert headline(report) == ("unbiased (mean of the 3 alignment patterns with test samples)", "pattern_average")
    bars = []
    monkeypatch.setattr(report_mod, "_save", lambda fig, path, tight=True: bars.extend(
        p.get_height() for p in fig.axes[0].patches))
    plot_groups(report, str(tmp_path / "groups.png"))
    summary = 1 + len(report_mod.METRIC_KEYS)
    assert len(bars) == 2 * (summary - 1)  # two models, each without its worst-group bar


def test_two_bias_group_plot_is_a_heatmap(tmp_path):
    path = tmp_path / "groups.png"
    plot_groups(_report(), str(path))
    from PIL import Image

    width, height = Image.open(path).size
    assert width < 2000 and height < 1200


def test_history_plot_marks_the_selected_epoch_once_per_halving(tmp_path, monkeypatch):
    history = [{"epoch": e, "temperature": t, "val": {"aligned_accuracy": 0.9, "conflicting_accuracy": 0.1,
                                                      "unbiased_accuracy": 0.2}}
               for e, t in ((1, 1.0), (2, 0.25), (3, 0.25), (4, 0.0625))]
    figures = []
    monkeypatch.setattr(report_mod, "_save", lambda fig, path, tight=True: figures.append(fig))
    assert plot_history(history, str(tmp_path / "h.png"), selected_epoch=3)
    ax = figures[0].axes[0]
    vertical = sorted(line.get_xdata()[0] for line in ax.lines if len(set(line.get_xdata())) == 1)
    assert vertical == [1, 3, 3]  # halvings after epochs 1 and 3, the selected epoch 3
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels.count("temperature halved") == 1 and "selected epoch (3)" in labels
    figures[0].canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # beside the axes: it covers no line
