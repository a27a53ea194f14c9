"""scripts/bise_results.py: its suites and what the rendered tables say about runs not yet made."""

import importlib.util
import json
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
                                 {**row("colored-mnist rho=0.995", 0, 0.2, 0.2), "vanilla_ok": False}]}}
    assert "**Earlier run**" not in script.render({}, earlier)  # a suite without a table of its own
    results = json.loads((ROOT / "benchmarks" / "results" / "bise-results.json").read_text())
    text = script.render({"demo": results["demo"]}, earlier)
    line = text.index("**Earlier run**")
    assert text.index("Suite `demo`") < line < text.index("\n## ", line)
    assert ("**Earlier run** (2026-11-30, commit(s) abc1234, CPU), conflicting gain: colored-mnist rho=0.99 "
            "+23.0 ± 2.8 (seeds 0, 1); colored-mnist rho=0.995 vanilla did not train (seeds 0).") in text


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
