"""scripts/bise_results.py: its suites and what the rendered tables say about runs not yet made."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("bise_results", ROOT / "scripts" / "bise_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_cnn_suite_is_the_main_settings_with_the_simple_cnn_and_its_full_recipe(script):
    main, cnn = script.configurations("main", [0, 1]), script.configurations("main-cnn", [0, 1])
    assert [c["data"] for c in cnn] == [c["data"] for c in main]
    assert {c["arch"] for c in cnn} == {"simple-cnn"} and {c["arch"] for c in main} == {"mlp"}
    assert {c["vanilla_epochs"] for c in cnn} == {None}  # the recipe's epochs, not the MLP's scaled-down ones


def test_a_suite_without_runs_is_listed_with_its_command_and_a_gpu_suite_with_device_cuda(script):
    text = script.render({})
    todo = text[text.index("## Not yet run"):]
    assert "`OMP_NUM_THREADS=1 python scripts/bise_results.py --suite main-cnn --device cuda`" in todo
    assert "`OMP_NUM_THREADS=1 python scripts/bise_results.py --suite demo`" in todo
    assert script.GPU_SUITES["main-cnn"] in todo


def test_the_committed_results_render_every_note_under_its_table(script):
    results = json.loads((ROOT / "benchmarks" / "results" / "bise-results.json").read_text())
    text = script.render(results)
    for suite, note in script.NOTES.items():
        if suite in results:
            table = text.index(f"Suite `{suite}`")
            assert table < text.index(note) < text.index("\n## ", table)


def test_an_earlier_run_is_listed_under_its_table_with_its_gains(script):
    def row(group, seed, vanilla, bise):
        return {"name": f"{group}-{seed}", "group": group, "seed": seed, "commit": "abc1234", "vanilla_ok": True,
                "vanilla_conflicting": vanilla, "bise_conflicting": bise}

    earlier = {"demo": {"meta": {"date": "2026-11-30", "device": "CPU"},
                        "runs": [row("colored-mnist rho=0.99", 0, 0.25, 0.50),
                                 row("colored-mnist rho=0.99", 1, 0.25, 0.46),
                                 {**row("colored-mnist rho=0.99", 2, 0.1, 0.1), "vanilla_ok": False},
                                 {**row("colored-mnist rho=0.995", 0, 0.2, 0.2), "vanilla_ok": False}]}}
    assert "**Earlier run**" not in script.render({}, earlier)  # a suite without a table of its own
    results = json.loads((ROOT / "benchmarks" / "results" / "bise-results.json").read_text())
    text = script.render({"demo": results["demo"]}, earlier)
    line = text.index("**Earlier run**")
    assert text.index("Suite `demo`") < line < text.index("\n## ", line)
    assert ("**Earlier run** (2026-11-30, commit(s) abc1234, CPU), conflicting gain: colored-mnist rho=0.99 "
            "+23.0 ± 2.8 (seeds 0, 1; left out (vanilla did not train): 2); colored-mnist rho=0.995 vanilla did "
            "not train (seeds 0).") in text


def test_docs_results_and_the_readme_blocks_are_what_the_committed_json_renders(script):
    """A committed result file without its regenerated docs (or a hand edit) fails here."""
    results = json.loads(script.STORE.read_text())
    assert script.DOC.read_text() == script.document(results), \
        "docs/results.md is stale: python scripts/bise_results.py --render-only --suite ... (every suite in the JSON)"
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme)
    text = (ROOT / "README.md").read_text()
    assert readme.rendered(text) == text, "README.md's generated blocks are stale: python scripts/update_readme.py"


def test_a_row_lists_the_seeds_it_averages_and_names_the_ones_left_out(script):
    """A seed whose vanilla did not train was left out of the accuracies but listed with the seeds (and its
    health averaged in), under a header that says "mean ± std over the seeds listed"."""
    def row(seed, ok, acc):
        health = {"train_accuracy": 0.9 if ok else 0.1, "n_conflicting_train": 10, "problems": [] if ok else ["x"]}
        r = {"seed": seed, "vanilla_ok": ok, "health": health}
        if ok:
            r.update(vanilla=0.5, bise=acc, bise_ft=acc, vanilla_conflicting=0.4, bise_conflicting=acc,
                     bise_worst_group=None, bise_zero_groups=1, best_epoch=10, mask_set="fresh-draw",
                     weights_removed=0.5, mmacs_vanilla=1.0, mmacs_bise=0.5)
        return r

    line = script._group_line("g", [row(0, True, 0.6), row(1, False, None), row(2, True, 0.7)])
    assert line.startswith("| g | 90.0 ± 0.0 / 10 | 50.0 ± 0.0 | 65.0 ± 7.1 |"), line
    assert line.endswith("| 0, 2; left out (vanilla did not train): 1 |"), line


def test_a_provenance_cut_short_is_an_unfinished_run(script, tmp_path):
    """provenance.json was written in place: a write cut short left a file that crashed the next run and
    --render-only (JSONDecodeError) where an unfinished run is to be redone."""
    path = tmp_path / "provenance.json"
    path.write_text('{"finished": tr')
    assert script._finished(path) is None and script._finished(tmp_path / "none.json") is None
    script._write(path, json.dumps({"finished": True, "seconds": {}}))
    assert script._finished(path) == {"finished": True, "seconds": {}} and os.listdir(tmp_path) == ["provenance.json"]
    path.write_text(json.dumps({"finished": False}))
    assert script._finished(path) is None
