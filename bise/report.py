"""The run report: report.json (keys in docs/cli.md), report.md (tables) and PNG plots.

report.json = {"vanilla": SECTION, "subnetwork": SECTION + {"units_pruned", "weights_removed"},
"finetuned": (same, only after fine-tuning), "export": {"max_abs_diff"}, "config": {...},
"timing": {"extraction_seconds", ...}} with SECTION = {"test": METRICS, "val": METRICS (if any),
"mmacs": millions of multiply-accumulates per input, "params": int}. Accuracies are fractions in
[0, 1]; every file is written atomically. weights_removed = 1 - params / the vanilla's params counted
the same way: for an export with --fold-bn, the vanilla's with its BatchNorms folded as the export's are
(the vanilla section's own "params" stays the model as trained, BatchNorm affine included). Two-bias
data (keys "y=3,b=3/5") are summarised by the four alignment patterns (the headline is their mean) and
a class-by-pattern table / heatmap instead of one row or bar per group.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

from torch import nn

from .checkpoint import atomic_write
from .evaluate import evaluate
from .flops import count_macs, count_params
from .health import DEAD_SAMPLES

SECTIONS = ("vanilla", "subnetwork", "finetuned", "export", "config", "timing")
METRIC_KEYS = ("accuracy", "aligned_accuracy", "conflicting_accuracy", "unbiased_accuracy", "worst_group_accuracy")
PLOTS = ("accuracy_vs_epoch.png", "units_per_layer.png", "group_accuracy.png")
REPORT_FILES = ("report.json", "report.md", *PLOTS)
MANY_GROUPS = 24  # more (y, b) groups than this: heatmaps and no per-group table


def write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def model_section(model: nn.Module, data, *, device="cpu", batch_size: int = 256, vanilla_params: Optional[int] = None,
                  units_pruned: Optional[float] = None, metrics_model: Optional[nn.Module] = None) -> dict:
    """{"test", "val" (if any), "mmacs", "params"} of ``model`` (metrics of ``metrics_model`` if given:
    the masked model, whose cost is the exported ``model``'s); plus units_pruned / weights_removed, the latter
    against ``vanilla_params`` counted as ``model`` is (BatchNorm folded where its export folded it)."""
    scored = metrics_model if metrics_model is not None else model
    section = evaluate(scored, data, batch_size=batch_size, device=device)
    section["mmacs"] = count_macs(model, data.input_shape)
    section["params"] = count_params(model)
    if units_pruned is not None:
        section["units_pruned"] = float(units_pruned)
        section["weights_removed"] = 1.0 - section["params"] / vanilla_params
    return section


def build_report(*, vanilla: dict, subnetwork: dict, export: dict, config: dict, timing: dict,
                 finetuned: Optional[dict] = None) -> dict:
    """The report dict in the fixed key order; "finetuned" only when given."""
    report = {"vanilla": vanilla, "subnetwork": subnetwork}
    if finetuned is not None:
        report["finetuned"] = finetuned
    report.update(export=export, config=config, timing=timing)
    return report


def headline(report: dict) -> tuple[str, str]:
    """(label, metric key) of the figure a report leads with: the unbiased accuracy, which for two-bias
    data is the mean over the four alignment patterns (the Multi-Color MNIST figure)."""
    test = report["vanilla"]["test"]
    if "pattern_average" in test:
        present = sum(v is not None for v in test.get("patterns", {}).values())  # a pattern without test samples
        return f"unbiased (mean of the {present} alignment patterns with test samples)" if present != 4 else \
            "unbiased (mean of the 4 alignment patterns)", "pattern_average"
    return "unbiased", "unbiased_accuracy"


def _class_by_pattern(groups: dict) -> dict:
    """Two-bias group accuracies "y=Y,b=L/R" -> {Y: {pattern: mean accuracy of its groups}}."""
    cells: dict = {}
    for key, v in groups.items():
        y_part, b_part = key.split(",")
        y = int(y_part.split("=")[1])
        left, right = (int(b) for b in b_part.split("=")[1].split("/"))
        name = f"{'aligned' if left == y else 'conflicting'}/{'aligned' if right == y else 'conflicting'}"
        if v is not None:
            cells.setdefault(y, {}).setdefault(name, []).append(v)
    return {y: {p: sum(vs) / len(vs) for p, vs in sorted(row.items())} for y, row in sorted(cells.items())}


def _pct(v) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _vanilla_lines(cfg: dict) -> list[str]:
    """What the vanilla is and how well it fit its training set (bise.health.check_vanilla, in run.json):
    a subnetwork of a vanilla that did not train means little."""
    v = cfg.get("vanilla") or {}
    how = (f"from --model {v['from']}" if "from" in v else f"trained {v.get('epochs', '?')} epochs (lr "
           f"{v.get('lr', '?')}, batch size {v.get('batch_size', '?')}, seed {v.get('seed', '?')})")
    lines = ["## Vanilla model", "", f"`{cfg.get('arch', '?')}` {how}."]
    h = v.get("health")
    if not h:
        return lines + ["", "Its training accuracy was not measured.", ""]
    conflicting = (f"{h['n_conflicting_train']} bias-conflicting of {h['n_train']} training samples "
                   f"({100 * h['n_conflicting_train'] / max(1, h['n_train']):.1f}%), of which it fits "
                   f"{_pct(h['conflicting_train_accuracy'])}%")
    units = h.get("units")
    dead = (f"ReLU units that never fire on the first {DEAD_SAMPLES:,} training inputs: {h.get('dead_units', '-')} "
            f"of {units}." if units else "Dead units: not measured (no ReLU or ReLU6 layer).")
    lines += ["", f"Training accuracy {_pct(h['train_accuracy'])}% (chance {_pct(h['chance'])}%, aligned samples "
                  f"{_pct(h['aligned_train_accuracy'])}%); {conflicting}. {dead}"]
    if h.get("problems"):
        lines += ["", "**The vanilla model did not train:** " + "; ".join(h["problems"]) + "."]
    return lines + [""]


def _protocol_lines(cfg: dict) -> list[str]:
    """How the masks were learnt and selected (and the fine-tuning), from the run's settings."""
    e = cfg.get("extraction") or {}
    r = e.get("result") or {}
    loss = (f"reweighted cross-entropy ({r.get('weighting', e.get('weighting'))})" if e.get("reweight", True)
            else "plain cross-entropy") + (" + mutual-information term" if e.get("mi", True) else "")
    keep = (f"the top {100 * e['budget']:g}% of units by score" if e.get("budget") is not None
            else "units with gate score >= 0")
    selected = r.get("selection", "?") + (f" (epoch {r['best_epoch']})" if r.get("best_epoch") is not None else "")
    lines = ["## Protocol", "",
             f"Masks and bias head learnt on the {r.get('mask_set', e.get('mask_set'))} set (batch size "
             f"{r.get('batch_size', e.get('batch_size'))}): {e.get('mask_epochs', '?')} mask epochs, "
             f"{e.get('head_epochs', '?')} head epochs per head phase; loss: {loss}; bias labels: "
             f"{'pseudo (label-free)' if e.get('label_free') else 'given'}; kept: {keep}; selection: {selected}"
             + ("; frozen forward passes in bf16 autocast (--amp)." if e.get("amp") else ".")]
    ft = cfg.get("finetune")
    if ft:
        lines += ["", f"BISE+FT fine-tuning: {ft.get('epochs')} epochs, lr {ft.get('lr')}, selection: "
                      f"{ft.get('selection')}."]
    return lines + [""]


def _models(report: dict) -> list[tuple[str, dict]]:
    return [(k, report[k]) for k in ("vanilla", "subnetwork", "finetuned") if k in report]


def render_markdown(report: dict, units: Optional[dict] = None) -> str:
    """report.md: summary per model and split, group and pattern tables, units per layer, timing, config."""
    lines = ["# BISE report", ""]
    cfg = report.get("config", {})
    data = cfg.get("data", {})
    evaluation = cfg.get("evaluate", {})
    lines += [f"Data `{data.get('spec', '?')}` (seed {data.get('seed', '?')}), arch `{cfg.get('arch', '?')}`, device "
              f"`{evaluation.get('device', '?')}`. Accuracies in %, cost in millions of multiply-accumulates "
              f"(MMACs, {evaluation.get('flop_counter', 'FlopCounterMode')}).", ""]
    label, key = headline(report)
    lines += [f"**Test accuracy, {label}:** " + " -> ".join(f"{name} {_pct(sec['test'][key])}"
                                                            for name, sec in _models(report) if sec.get("test")), ""]
    if "vanilla" in cfg or "extraction" in cfg:
        lines += _vanilla_lines(cfg) + _protocol_lines(cfg)
    for split in ("test", "val"):
        rows = [(name, sec[split]) for name, sec in _models(report) if sec.get(split)]
        if not rows:
            continue
        lines += [f"## {split} split", "", "| model | accuracy | aligned | conflicting | unbiased | worst group |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | " + " | ".join(_pct(m.get(k)) for k in METRIC_KEYS) + " |" for name, m in rows]
        if "patterns" in rows[0][1]:
            names = list(rows[0][1]["patterns"])
            lines += ["", "| model | " + " | ".join(names) + " | average |", "|---|" + "---|" * (len(names) + 1)]
            lines += [f"| {name} | " + " | ".join(_pct(m["patterns"][p]) for p in names) +
                      f" | {_pct(m['pattern_average'])} |" for name, m in rows]
        lines.append("")
    lines += ["## Cost", "", "| model | MMACs | params | units pruned | weights removed |", "|---|---|---|---|---|"]
    for name, sec in _models(report):
        lines.append(f"| {name} | {sec['mmacs']:.3f} | {sec['params']} | {_pct(sec.get('units_pruned'))} | "
                     f"{_pct(sec.get('weights_removed'))} |")
    latency = report.get("timing", {}).get("latency_seconds", {})
    if latency:
        lines += ["", "| model | latency batch 1 (ms) | latency batch 256 (ms) |", "|---|---|---|"]
        for name, lat in latency.items():
            lines.append(f"| {name} | " + " | ".join(
                "-" if lat.get(k) is None else f"{1e3 * lat[k]:.3f}" for k in ("batch_1", "batch_256")) + " |")
    lines += ["", f"Export: max |exported - masked| on the test split = {report['export']['max_abs_diff']:.3g}", ""]
    test_groups = [(name, sec["test"]["groups"]) for name, sec in _models(report) if sec.get("test")]
    if test_groups and "/" in next(iter(test_groups[0][1]), ""):
        lines += ["## Test accuracy per target class and alignment pattern (left/right bias)", "",
                  "Mean accuracy of the (y, b_left, b_right) groups of each class and pattern; every group is in "
                  "report.json.", ""]
        for name, groups in test_groups:
            table = _class_by_pattern(groups)
            names = sorted({p for row in table.values() for p in row})
            lines += [f"{name}:", "", "| y | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            lines += [f"| {y} | " + " | ".join(_pct(row.get(p)) for p in names) + " |" for y, row in table.items()]
            lines.append("")
    elif test_groups and len(test_groups[0][1]) > MANY_GROUPS:
        lines += ["## Test accuracy per (y, b) group", "", "Heatmaps in group_accuracy.png; every group is in "
                  "report.json.", ""]
    elif test_groups:
        keys = list(test_groups[0][1])
        lines += ["## Test accuracy per (y, b) group", "", "| group | " + " | ".join(n for n, _ in test_groups) + " |",
                  "|---|" + "---|" * len(test_groups)]
        lines += [f"| {k} | " + " | ".join(_pct(g.get(k)) for _, g in test_groups) + " |" for k in keys]
        lines.append("")
    if units:
        lines += ["## Units kept per gated layer", "", "| layer | kept | total |", "|---|---|---|"]
        lines += [f"| {n} | {kept} | {total} |" for n, (kept, total) in units.items()]
        lines.append("")
    lines += ["## Timing (seconds)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report.get("timing", {}).items() if isinstance(v, (int, float))]
    lines += ["", "## Config", "", "```json", json.dumps(report.get("config", {}), indent=1, default=str), "```", ""]
    return "\n".join(lines)


def _temperature_steps(history: list) -> list[int]:
    """Epochs after which the temperature was halved."""
    return [a["epoch"] for a, b in zip(history, history[1:]) if b.get("temperature") != a.get("temperature")]


def plot_history(history: list, path: str, selected_epoch: Optional[int] = None) -> bool:
    """Aligned / conflicting / unbiased accuracy per mask epoch (validation, else the logged test metrics),
    with the temperature halvings and the selected epoch marked. False when the history holds no
    per-epoch metrics."""
    key = "val" if any(r.get("val") for r in history) else "test"
    rows = [r for r in history if r.get(key)]
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [r["epoch"] for r in rows]
    for metric, label in (("aligned_accuracy", "aligned"), ("conflicting_accuracy", "conflicting"),
                          ("unbiased_accuracy", "unbiased")):
        ax.plot(epochs, [r[key][metric] if r[key][metric] is not None else float("nan") for r in rows],
                marker=".", label=label)
    for i, e in enumerate(sorted(set(_temperature_steps(history)))):
        ax.axvline(e, color="grey", lw=0.6, ls="--", label="temperature halved" if i == 0 else None)
    if selected_epoch is not None:
        ax.axvline(selected_epoch, color="black", lw=1.2, label=f"selected epoch ({selected_epoch})")
    ax.set(xlabel="mask epoch", ylabel=f"{key} accuracy", ylim=(0, 1.02), title="BISE mask learning")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the axes, never over a line
    _save(fig, path)
    return True


def plot_units(units: dict, path: str) -> None:
    """Kept vs total units of every gated layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(units)
    fig, ax = plt.subplots(figsize=(max(5, 0.4 * len(names) + 2), 4))
    xs = range(len(names))
    ax.bar(xs, [t for _, t in units.values()], color="lightgrey", label="total")
    ax.bar(xs, [k for k, _ in units.values()], color="tab:blue", label="kept")
    ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="units", title="surviving units per layer")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    _save(fig, path)


def _group_matrix(groups: dict):
    """(y rows x b columns) accuracy matrix of single-bias group keys "y=..,b=.." (NaN where absent)."""
    import numpy as np

    cells = {tuple(int(part.split("=")[1]) for part in key.split(",")): v for key, v in groups.items()}
    rows, cols = max(y for y, _ in cells) + 1, max(b for _, b in cells) + 1
    matrix = np.full((rows, cols), np.nan)
    for (y, b), v in cells.items():
        matrix[y, b] = np.nan if v is None else v
    return matrix


def plot_groups(report: dict, path: str) -> None:
    """Summary test metrics per model (bars, the headline first), then the group accuracies: bars for
    a few groups; for many, one heatmap per model: y by b (one bias) or y by alignment pattern (two)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = [(name, sec["test"]) for name, sec in _models(report)]
    keys = list(models[0][1]["groups"])
    two_bias = "/" in keys[0]
    heatmaps = two_bias or len(keys) > MANY_GROUPS
    summary = (("pattern_average",) if two_bias else ()) + METRIC_KEYS
    fig = plt.figure(figsize=(max(8, 5 * len(models)) if heatmaps else max(8, 0.15 * len(keys) * len(models) + 3), 8),
                     layout="constrained")  # room for the rotated labels, titles and the colorbar
    grid = fig.add_gridspec(2, len(models) if heatmaps else 1)
    top = fig.add_subplot(grid[0, :])
    width = 0.8 / len(models)
    for i, (name, m) in enumerate(models):
        values = [m[k] for k in summary]  # a metric without samples (None) gets no bar, not one at 0%
        top.bar([j + i * width for j, v in enumerate(values) if v is not None], [v for v in values if v is not None],
                width, label=name)
    top.set_xticks([j + 0.4 - width / 2 for j in range(len(summary))],
                   ["unbiased\n(4 patterns)" if k == "pattern_average" else k.replace("_accuracy", "").replace("_", " ")
                    for k in summary])
    top.set(ylabel="test accuracy", ylim=(0, 1.02), title=" vs ".join(n for n, _ in models))
    top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    if heatmaps:
        for i, (name, m) in enumerate(models):
            ax = fig.add_subplot(grid[1, i])
            if two_bias:
                table = _class_by_pattern(m["groups"])
                names = sorted({p for row in table.values() for p in row})
                matrix = np.array([[row.get(p, np.nan) for p in names] for row in table.values()])
                image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
                ax.set_xticks(range(len(names)), [n.replace("/", "/\n") for n in names], fontsize=7)
                ax.set_yticks(range(len(table)), list(table))
                ax.set(xlabel="alignment pattern (left/right)", ylabel="target y", title=f"{name}\nmean group accuracy")
            else:
                image = ax.imshow(_group_matrix(m["groups"]), vmin=0, vmax=1, cmap="viridis")
                ax.set(xlabel="bias label b", ylabel="target y", title=f"{name}\ngroup accuracy")
        fig.colorbar(image, ax=fig.axes[1:], shrink=0.8)
    else:
        bottom = fig.add_subplot(grid[1, 0])
        for i, (name, m) in enumerate(models):
            bottom.bar([j + i * width for j in range(len(keys))],
                       [m["groups"][k] if m["groups"].get(k) is not None else 0.0 for k in keys], width, label=name)
        bottom.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys, rotation=90, fontsize=7)
        bottom.set(ylabel="group accuracy", ylim=(0, 1.02))
    _save(fig, path, tight=False)


def _save(fig, path: str, tight: bool = True) -> None:
    import matplotlib.pyplot as plt

    if tight:
        fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def write_report(out_dir: str, report: dict, *, history: Optional[list] = None,
                 units: Optional[dict] = None, selected_epoch: Optional[int] = None) -> list[str]:
    """Write report.json, report.md and the plots into ``out_dir``; returns the paths written (under
    torchrun a collective: every rank calls it with the same ``out_dir``, rank 0 writes).

    ``units``: gated layer -> (kept, total); ``history``: the extraction's per-epoch records;
    ``selected_epoch``: the mask epoch whose scores became the masks (marked in the history plot)."""
    missing = [k for k in ("vanilla", "subnetwork", "export", "config", "timing") if k not in report]
    if missing:
        raise ValueError(f"report lacks the sections {missing}")
    paths = [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md")]
    write_text(paths[0], json.dumps(report, indent=1, default=str))
    write_text(paths[1], render_markdown(report, units))
    if history and plot_history(history, os.path.join(out_dir, PLOTS[0]), selected_epoch):
        paths.append(os.path.join(out_dir, PLOTS[0]))
    if units:
        plot_units(units, os.path.join(out_dir, PLOTS[1]))
        paths.append(os.path.join(out_dir, PLOTS[1]))
    plot_groups(report, os.path.join(out_dir, PLOTS[2]))
    paths.append(os.path.join(out_dir, PLOTS[2]))
    return paths


__all__ = ["PLOTS", "REPORT_FILES", "SECTIONS", "atomic_write", "build_report", "headline", "model_section",
           "render_markdown", "write_report", "write_text"]
