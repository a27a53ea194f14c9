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
