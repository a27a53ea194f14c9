"""Every command sequence of docs/cli.md, with an --overwrite or a kill between (or inside) steps:
``bise evaluate`` then either reports one consistent chain of artefacts or refuses with a named error,
and finishing the sequence always gives a consistent report."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bise.cli import main

ROOT = Path(__file__).resolve().parents[2]
DATA = ["--data", "colored-digits"]
STEPS = {
    "train": ["train", *DATA, "--arch", "mlp", "--vanilla-epochs", "1"],
    "extract": ["extract", "--mask-epochs", "2", "--head-epochs", "1"],
    "export": ["export"],
    "finetune": ["finetune", "--finetune-epochs", "1"],
}
ORDER = list(STEPS)
# Kill the process right after its N-th os.replace: inside a step's commit (staged file, run.json, ...).
KILLER = """import os, signal, sys
count, real = [0], os.replace
def replace(a, b):
    real(a, b)
    count[0] += 1
    if count[0] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from bise.cli import main
sys.exit(main(sys.argv[2:]))
"""


def step(name: str, out: Path, *extra: str) -> int:
    return main([*STEPS[name], "--out", str(out), "--quiet", *extra])


def killed(n: int, args: list) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(n), *args, "--quiet"], env=env, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate(out: Path, capsys) -> str:
    """"ok" after checking the report's chain from the files themselves, else the one-line named error."""
    capsys.readouterr()
    code = main(["evaluate", "--out", str(out), "--latency-repeats", "0", "--quiet"])
    err = capsys.readouterr().err.strip()
    if code != 0:
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("bise evaluate: error: "), err
        return err
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "run.json").read_text())["artefacts"]
    masks_inputs = manifest["masks.pt"]["inputs"]
    (source, digest), = masks_inputs.items()
    vanilla_path = out / source if source == "vanilla.pt" else Path(source)
    assert sha(vanilla_path) == digest
    vanilla = torch.load(vanilla_path, weights_only=True)["state_dict"]
    masked = torch.load(out / "masks.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, masked[k]) for k, v in vanilla.items())  # the masks were learned on this vanilla
    assert report["export"]["max_abs_diff"] <= 1e-5  # subnetwork.pt is the export of these masks
    assert manifest["subnetwork.pt"]["inputs"] == {"masks.pt": sha(out / "masks.pt")}
    if "finetuned" in report:
        assert manifest["finetuned.pt"]["inputs"] == {"masks.pt": sha(out / "masks.pt"),
                                                      "subnetwork.pt": sha(out / "subnetwork.pt")}
    else:
        assert not (out / "finetuned.pt").exists()
    assert report["config"]["data"] == manifest["masks.pt"]["data"]
    for name, entry in manifest.items():
        if entry["sha256"] is not None:
            assert sha(out / name) == entry["sha256"], name
    return "ok"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The one-step sequence train, extract, export, finetune, evaluate, run once."""
    out = tmp_path_factory.mktemp("chain") / "base"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ORDER:
            assert step(name, out) == 0, name
        assert main(["evaluate", "--out", str(out), "--latency-repeats", "0", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def copy(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base, out)
    return out


@pytest.mark.parametrize("redo", ORDER)
def test_overwrite_between_steps(base, tmp_path, capsys, redo):
    out = copy(base, tmp_path)
    extra = ["--vanilla-epochs", "0"] if redo == "train" else ["--mask-epochs", "1"] if redo == "extract" else \
        ["--round-to", "8"] if redo == "export" else []
    assert step(redo, out, "--overwrite", *extra) == 0
    state = evaluate(out, capsys)
    if redo in ("finetune", "export"):
        assert state == "ok"
    else:  # the files made from the replaced one are gone
        assert state.endswith(f"is missing; run `bise {ORDER[ORDER.index(redo) + 1]} --out {out}` first"), state
    if redo == "export":  # the fine-tuned model of the old export is gone, not reported
        assert "finetuned" not in json.loads((out / "report.json").read_text())
    for name in ORDER[ORDER.index(redo) + 1:]:
        assert step(name, out) == 0, name
    assert evaluate(out, capsys) == "ok"


@pytest.mark.parametrize("redo, kill_after", [("train", 2), ("extract", 3), ("export", 4)])
def test_kill_inside_a_step(base, tmp_path, capsys, redo, kill_after):
    out = copy(base, tmp_path)
    before = {f: sha(out / f) for f in os.listdir(out) if (out / f).is_file()}
    assert killed(kill_after, [*STEPS[redo], "--out", str(out), "--overwrite"]) == -9
    state = evaluate(out, capsys)
    if state == "ok":  # the kill came before the commit: the old chain is untouched
        assert all(sha(out / f) == h for f, h in before.items() if not f.startswith(("report", "run.json", ".bise"))
                   and not f.endswith(".png"))
    for name in ORDER[ORDER.index(redo):]:
        code = step(name, out, "--overwrite")
        assert code == 0, (name, capsys.readouterr().err)
    assert evaluate(out, capsys) == "ok"


def test_run_killed_then_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", *DATA, "--arch", "mlp", "--vanilla-epochs", "1", "--mask-epochs", "2", "--head-epochs", "1",
            "--latency-repeats", "0", "--out", str(out)]
    assert killed(6, args) == -9  # after the vanilla, inside the extraction
    state = evaluate(out, capsys)
    if (out / "checkpoint.pt").is_file():  # the extraction had started: the hint continues it
        assert state.endswith(f"masks.pt is missing: the `bise extract` that checkpoint.pt holds did not finish; "
                              f"continue it with `bise extract --out {out} --resume` and the options it was started "
                              "with"), state
    else:
        assert state.endswith(f"masks.pt is missing; run `bise extract --out {out}` first"), state
    assert main([*args, "--resume", "--quiet"]) == 0
    assert evaluate(out, capsys) == "ok"


def test_failed_overwrites_keep_the_old_outputs(base, tmp_path, capsys):
    out = copy(base, tmp_path)
    before = {f: sha(out / f) for f in os.listdir(out) if (out / f).is_file() and f != ".bise.lock"}
    assert step("export", out, "--overwrite", "--data", "colored-digits:rho=0.9") == 2
    assert "was made from --data 'colored-digits' --seed 0" in capsys.readouterr().err
    (out / "subnetwork.pt").write_bytes((out / "subnetwork.pt").read_bytes()[:-10])  # damaged
    assert main(["evaluate", "--out", str(out), "--quiet"]) == 2
    assert "subnetwork.pt changed after `bise export` wrote it" in capsys.readouterr().err
    (out / "vanilla.pt").write_bytes(b"garbage")
    assert step("extract", out, "--overwrite") == 2
    assert "vanilla.pt changed after `bise train` wrote it" in capsys.readouterr().err
    after = {f: sha(out / f) for f in os.listdir(out) if (out / f).is_file() and f != ".bise.lock"}
    assert {f: h for f, h in after.items() if f not in ("subnetwork.pt", "vanilla.pt")} == \
        {f: h for f, h in before.items() if f not in ("subnetwork.pt", "vanilla.pt")}


def test_extract_from_model_records_it(base, tmp_path, capsys):
    out, model = tmp_path / "mine", tmp_path / "my_vanilla.pt"
    shutil.copy(base / "vanilla.pt", model)
    assert main(["extract", *DATA, "--model", str(model), "--mask-epochs", "1", "--head-epochs", "0", "--out", str(out),
                 "--quiet"]) == 0
    assert step("export", out) == 0
    assert evaluate(out, capsys) == "ok"
    vanilla = json.loads((out / "report.json").read_text())["config"]["vanilla"]
    assert vanilla["from"] == str(model) and set(vanilla) == {"from", "health"}
    assert step("train", out, "--vanilla-epochs", "0") == 0  # an unrelated vanilla.pt beside the masks
    assert evaluate(out, capsys) == "ok"  # still reports --model, which the masks were made from
    torch.save({"format": "bise-vanilla-v1"}, model)
    assert evaluate(out, capsys).endswith(f"was made from --model {model}, which has changed since (content hash "
                                          "differs); extract again with --overwrite")


def test_run_from_model_and_run_overwrite_with_other_data(base, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--model", str(base / "vanilla.pt"), *DATA, "--mask-epochs", "1", "--head-epochs", "0",
            "--latency-repeats", "0", "--finetune-epochs", "1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert evaluate(out, capsys) == "ok"
    timing = json.loads((out / "report.json").read_text())["timing"]
    assert "vanilla_training_seconds" not in timing and "extraction_seconds" in timing  # docs/cli.md: not for --model
    other = ["run", "--data", "colored-digits:rho=0.9", "--arch", "mlp", "--vanilla-epochs", "0", "--mask-epochs", "1",
             "--head-epochs", "0", "--latency-repeats", "0", "--out", str(out), "--quiet", "--overwrite"]
    assert main(other) == 0
    assert evaluate(out, capsys) == "ok"
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["data"]["spec"] == "colored-digits:rho=0.9" and "finetuned" not in report
