"""Every script of examples/ runs end to end with its smallest settings and prints its key line.

Each runs as a user runs it (``python examples/NAME.py ...``, a subprocess) against this checkout
(PYTHONPATH), on one thread, with a data cache of the test's own. The scripts assert what they
demonstrate (unmask_model's outputs, the exact global top-k count, the export against the masked
model, each gate rule's mask), so a wrong result is a non-zero exit here.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# script, smallest arguments, a line its output must contain, whether it reads colored-digits (scikit-learn)
CASES = [
    ("edge_popup_mlp.py", ["--densities", "0.5", "--epochs", "2", "--hidden", "64"],
     "non-zero weights per layer [6144, 2048, 320] (= max(1, round(density * numel)))", True),
    ("global_topk_resnet.py", ["--dense-epochs", "1", "--epochs", "1", "--width", "8"],
     "all 9 conv layers: 1929 of 19288 weights kept = max(1, round(0.1 * 19288)), exactly", True),
    ("bise_own_data.py", ["--n-train", "400", "--n-test", "200", "--vanilla-epochs", "10", "--mask-epochs", "2",
                          "--head-epochs", "1"], "bise.load_exported gives the same outputs", False),
    ("channel_gates.py", ["--epochs", "1"], "checked: threshold gates open iff score >= 0", True),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("examples_cache")


@pytest.mark.parametrize("script, args, key, digits", CASES, ids=[c[0] for c in CASES])
def test_example_runs(script, args, key, digits, tmp_path, cache_dir):
    pytest.importorskip("torch_pruning")  # the [bise] extra
    if digits:
        pytest.importorskip("sklearn")  # the [data] extra: colored-digits
    if script == "bise_own_data.py":
        args = [*args, "--out", str(tmp_path / "out")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", BISE_CACHE_DIR=str(cache_dir))
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert key in proc.stdout, proc.stdout
    if script == "bise_own_data.py":
        assert {p.name for p in (tmp_path / "out").iterdir()} == {"data.npz", "subnetwork.pt", "subnetwork.json"}


def test_every_example_is_tested_listed_and_documented():
    """Each script: in CASES, in examples/README.md's table with its command, a docstring giving the
    command that runs it, and a --device option."""
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(c[0] for c in CASES)
    readme = (EXAMPLES / "README.md").read_text()
    for name in scripts:
        source = (EXAMPLES / name).read_text()
        doc = ast.get_docstring(ast.parse(source))
        assert doc and f"python examples/{name}" in doc, name
        assert f"python examples/{name}" in readme and f"[`{name}`]({name})" in readme, name
        assert '"--device"' in source, name
