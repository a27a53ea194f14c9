"""The bise CLI end to end on the tiny colored-digits data, in process, plus its bad-input paths."""

import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from _userdata import write_npz

from bise.cli import main
from bise.export import load_exported

TINY = ["--data", "colored-digits", "--arch", "mlp", "--vanilla-epochs", "2", "--mask-epochs", "2",
        "--head-epochs", "1", "--latency-repeats", "1", "--quiet"]
EXTRACT = ["--mask-epochs", "2", "--head-epochs", "1", "--quiet"]
RUN_FILES = ["vanilla.pt", "masks.pt", "subnetwork.pt", "subnetwork.json", "report.json", "report.md",
             "accuracy_vs_epoch.png", "units_per_layer.png", "group_accuracy.png", "run.json", "checkpoint.pt"]
METRICS = ("accuracy", "aligned_accuracy", "conflicting_accuracy", "unbiased_accuracy", "worst_group_accuracy")



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", *TINY, "--finetune-epochs", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _check_metrics(m):
    assert set(METRICS) <= set(m) and isinstance(m["groups"], dict) and m["groups"]
    for v in [m[k] for k in METRICS] + list(m["groups"].values()):
        assert v is None or 0.0 <= v <= 1.0


def test_run_writes_everything(run_dir):
    for name in RUN_FILES + ["finetuned.pt", "finetuned.json"]:
        assert (run_dir / name).is_file(), name
    assert not [f for f in os.listdir(run_dir) if f.endswith(".tmp")]
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report) == ["vanilla", "subnetwork", "finetuned", "export", "config", "timing"]
    for section in ("vanilla", "subnetwork", "finetuned"):
        sec = report[section]
        _check_metrics(sec["test"])
        _check_metrics(sec["val"])
        assert sec["mmacs"] > 0 and isinstance(sec["params"], int)
    sub = report["subnetwork"]
    assert 0.0 <= sub["units_pruned"] <= 1.0 and 0.0 <= sub["weights_removed"] <= 1.0
    assert sub["params"] <= report["vanilla"]["params"]
    assert report["export"]["max_abs_diff"] <= 1e-5
    assert report["timing"]["extraction_seconds"] > 0
    assert set(report["timing"]["latency_seconds"]["subnetwork"]) == {"batch_1", "batch_256"}
    assert report["config"]["extraction"]["mask_epochs"] == 2 and report["config"]["data"]["spec"] == "colored-digits"
    finetune = report["config"]["finetune"]  # what BISE+FT ran with: 0.01 x the mlp recipe's Adam 1e-3
    assert (finetune["epochs"], finetune["optimizer"], finetune["lr"]) == (1, "adam", pytest.approx(1e-5))
    model = load_exported(str(run_dir / "subnetwork.pt"))
    with torch.no_grad():
        assert model(torch.rand(2, 3, 8, 8)).shape == (2, 10)
    assert "| subnetwork |" in (run_dir / "report.md").read_text()


def test_out_dir_with_a_run_is_refused_then_resumed(run_dir, capsys):
    def stamps():
        return {f: (run_dir / f).stat().st_mtime_ns for f in os.listdir(run_dir) if f != ".bise.lock"}

    before = stamps()
    assert main(["run", *TINY, "--out", str(run_dir)]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert before == stamps()
    assert main(["run", *TINY, "--out", str(run_dir), "--resume", "--overwrite"]) == 2
    assert main(["run", *TINY, "--out", str(run_dir), "--data", "colored-digits:rho=0.9", "--resume"]) == 2
    assert "holds a run on --data" in capsys.readouterr().err
    assert main(["run", *TINY, "--out", str(run_dir), "--resume"]) == 0  # finished steps are reused
    assert "finetuned" in json.loads((run_dir / "report.json").read_text())  # still reported
    made = {f: t for f, t in stamps().items() if f in ("vanilla.pt", "masks.pt", "subnetwork.pt", "checkpoint.pt")}
    # the run's data spelled with its default rho: the same data, the run's own spec, nothing redone
    assert main(["run", *TINY, "--out", str(run_dir), "--data", "colored-digits:rho=0.990", "--resume"]) == 0
    assert len(made) == 4 and made == {f: stamps()[f] for f in made}
    assert json.loads((run_dir / "report.json").read_text())["config"]["data"]["spec"] == "colored-digits"
    assert main(["run", *TINY, "--arch", "simple-cnn", "--out", str(run_dir), "--resume"]) == 2
    assert "holds a mlp model, not --arch simple-cnn" in capsys.readouterr().err


def test_resume_with_finetune_epochs_0_drops_the_fine_tuned_model(run_dir, tmp_path):
    """--finetune-epochs 0 asks for no fine-tuning: a resumed run reports none and keeps no finetuned.pt
    (it kept and reported the one of the earlier --finetune-epochs 1); without the option a resume
    keeps it."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns(".bise.lock"))
    assert main(["run", *TINY, "--out", str(out), "--resume"]) == 0
    assert "finetuned" in json.loads((out / "report.json").read_text()) and (out / "finetuned.pt").is_file()
    assert main(["run", *TINY, "--out", str(out), "--resume", "--finetune-epochs", "0"]) == 0
    assert "finetuned" not in json.loads((out / "report.json").read_text())
    assert not (out / "finetuned.pt").exists()


def test_one_step_commands(run_dir, tmp_path, capsys):
    out = tmp_path / "steps"
    common = ["--out", str(out), "--quiet"]
    assert main(["export", "--data", "colored-digits", *common]) == 2
    assert "masks.pt is missing" in capsys.readouterr().err
    assert not out.exists()  # nothing left behind
    assert main(["extract", *TINY[:4], *EXTRACT, "--model", str(run_dir / "vanilla.pt"), "--out",
                 str(tmp_path / "ext")]) == 0
    assert (tmp_path / "ext" / "masks.pt").is_file() and not (tmp_path / "ext" / "vanilla.pt").exists()
    assert main(["train", *TINY[:4], "--vanilla-epochs", "1", *common]) == 0
    assert main(["train", *TINY[:4], *common]) == 2  # vanilla.pt exists
    assert "already has vanilla.pt; pass --overwrite" in capsys.readouterr().err
    assert main(["train", *TINY[:4], "--vanilla-epochs", "1", "--overwrite", *common]) == 0
    assert main(["extract", "--mask-epochs", "1", "--head-epochs", "0", *common]) == 0  # --data from run.json
    assert main(["export", "--fold-bn", *common]) == 0
    assert main(["finetune", "--finetune-epochs", "1", *common]) == 0
    assert main(["evaluate", "--latency-repeats", "0", *common]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "finetuned" in report and report["export"]["max_abs_diff"] <= 1e-5
    assert "latency_seconds" not in report["timing"]


def test_pretrained_reaches_the_vanilla_training_and_its_faults_name_the_flag(tmp_path, capsys):
    out = tmp_path / "pre"
    base = ["train", "--data", "colored-digits", "--vanilla-epochs", "1", "--out", str(out), "--quiet"]
    assert main([*base, "--arch", "mlp", "--pretrained"]) == 2
    assert "--pretrained: pretrained (ImageNet weights) is available for resnet18 and mobilenetv2, not 'mlp'" in \
        capsys.readouterr().err
    assert main([*base, "--arch", "resnet18", "--pretrained", str(tmp_path / "none.pth")]) == 2
    assert f"--pretrained: pretrained={str(tmp_path / 'none.pth')!r} does not exist" in capsys.readouterr().err
    assert not (out / "vanilla.pt").exists()
    weights = tmp_path / "resnet18.pth"
    torch.save({"not": torch.zeros(1)}, weights)
    with mock.patch("bise.train.train_vanilla", side_effect=ValueError("stop here")) as train:
        assert main([*base, "--arch", "resnet18", "--pretrained", str(weights)]) == 2
    assert train.call_args.kwargs["pretrained"] == str(weights)  # absolute (tmp_path is)
    with mock.patch("bise.train.train_vanilla", side_effect=ValueError("stop here")) as train:
        assert main([*base, "--arch", "mobilenetv2", "--pretrained"]) == 2
    assert train.call_args.kwargs["pretrained"] is True  # the installed copy
    with mock.patch("bise.train.train_vanilla", side_effect=ValueError("stop here")) as train:
        assert main([*base, "--arch", "mlp"]) == 2
    assert train.call_args.kwargs["pretrained"] is False
    capsys.readouterr()
    # the flag is named by the error's type: the missing cache's message has no "pretrained" in it (it was not
    # labelled), and another error whose text says "pretrained" is not the flag's (it was labelled)
    with mock.patch.dict(os.environ, {"TORCH_HOME": str(tmp_path / "torch-home")}):
        assert main([*base, "--arch", "resnet18", "--pretrained"]) == 2
    assert "error: --pretrained: resnet18 ImageNet weights are not in torchvision's cache" in capsys.readouterr().err
    with mock.patch("bise.train.train_vanilla", side_effect=ValueError("data of the pretrained run")):
        assert main([*base, "--arch", "resnet18", "--pretrained", str(weights)]) == 2
    assert capsys.readouterr().err == "bise train: error: data of the pretrained run\n"


def test_two_bias_data_without_a_pair_rho_is_refused_before_the_vanilla(tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("test", 20)):
        y = rng.integers(0, 2, n)
        arrays.update({f"{split}_x": rng.integers(0, 255, (n, 4, 4, 3), dtype=np.uint8), f"{split}_y": y,
                       f"{split}_b": np.stack([rng.integers(0, 2, n), y], axis=1)})  # the right bias never conflicts
    np.savez(tmp_path / "two.npz", **arrays)
    out = tmp_path / "run"
    assert main(["run", "--data", str(tmp_path / "two.npz"), "--arch", "mlp", "--out", str(out), "--quiet"]) == 2
    assert "weighting 'two-bias' needs rho=(rho_left, rho_right)" in capsys.readouterr().err
    assert not (out / "vanilla.pt").exists()


def test_bad_input(tmp_path, capsys):
    out = tmp_path / "bad"
    assert main(["run", "--data", "no-such-data", "--out", str(out), "--quiet"]) == 2
    assert "--data 'no-such-data'" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exit_:  # the parser's choices
        main(["run", *TINY, "--arch", "vgg", "--out", str(out)])
    assert exit_.value.code == 2 and "argument --arch: invalid choice: 'vgg'" in capsys.readouterr().err
    assert not out.exists()
    assert main(["run", *TINY, "--model", str(tmp_path / "none.pt"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage")
    assert main(["run", *TINY, "--model", str(corrupt), "--out", str(out)]) == 2
    assert "corrupt" in capsys.readouterr().err and not out.exists()
    (tmp_path / "file").write_text("x")
    assert main(["run", *TINY, "--out", str(tmp_path / "file")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["run", *TINY, "--budget", "1.5", "--out", str(out)])
    assert exc.value.code == 2 and "--budget" in capsys.readouterr().err


def test_bias_classes_differ_leaves_nothing(tmp_path, capsys):
    write_npz(tmp_path / "three_bias.npz", bias_classes=3)
    out = tmp_path / "run"
    args = ["run", "--data", str(tmp_path / "three_bias.npz"), "--arch", "mlp", "--vanilla-epochs", "1",
            "--mask-epochs", "1", "--head-epochs", "0", "--quiet", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bias classes" in err and not out.exists()


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "bise", "run", "--out", "x", "--mask-epochs", "0"],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__)))))
    assert proc.returncode == 2 and "--mask-epochs must be >= 1" in proc.stderr


def test_finetune_api_selects_best_val_and_copies(run_dir):
    from bise.data import load
    from bise.evaluate import evaluate
    from bise.finetune import finetune

    data = load("colored-digits")
    model = load_exported(str(run_dir / "subnetwork.pt"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = []
    tuned = finetune(model, data, epochs=2, history=history, quiet=True)
    assert [r["epoch"] for r in history] == [1, 2] and not tuned.training
    assert evaluate(tuned, data.val)["accuracy"] == max(r["val"]["accuracy"] for r in history)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    same = finetune(model, data, epochs=0, quiet=True)
    x = data.test.inputs()[:16]
    with torch.no_grad():
        assert torch.equal(same(x), model(x))
    with pytest.raises(ValueError, match="scheme"):
        finetune(model, data, epochs=1, scheme="nope")
    with pytest.raises(ValueError, match="epochs"):
        finetune(model, data, epochs=-1)


def test_resume_of_a_moved_run_reuses_its_steps_and_fine_tunes_again(run_dir, tmp_path):
    """run --resume in a moved --out keeps masks.pt and subnetwork.pt, and keeps finetuned.pt only
    if it was made with the --finetune-epochs asked for."""

    out = tmp_path / "moved"
    shutil.copytree(run_dir, out)
    stamps = {f: (out / f).stat().st_mtime_ns for f in ("masks.pt", "subnetwork.pt", "finetuned.pt")}
    assert main(["run", *TINY, "--finetune-epochs", "2", "--out", str(out), "--resume"]) == 0
    assert {f: (out / f).stat().st_mtime_ns for f in stamps} == {**stamps, "finetuned.pt": mock.ANY}
    assert (out / "finetuned.pt").stat().st_mtime_ns != stamps["finetuned.pt"]
    assert json.loads((out / "run.json").read_text())["artefacts"]["finetuned.pt"]["settings"]["epochs"] == 2
    assert json.loads((out / "report.json").read_text())["config"]["finetune"]["epochs"] == 2


def test_report_states_the_vanilla_health_and_the_protocol(run_dir, tmp_path):
    """report.md says how well the vanilla fit its training set (conflicting samples included) and how
    the masks were learnt and selected; also for a vanilla given to `bise extract --model`."""
    health = json.loads((run_dir / "run.json").read_text())["artefacts"]["vanilla.pt"]["settings"]["health"]
    text = (run_dir / "report.md").read_text()
    vanilla = text.split("## Vanilla model\n", 1)[1].split("\n## ", 1)[0]
    assert f"{100 * health['train_accuracy']:.1f}%" in vanilla
    assert f"{health['n_conflicting_train']} bias-conflicting" in vanilla and "2 epochs" in vanilla
    protocol = text.split("## Protocol\n", 1)[1].split("\n## ", 1)[0]
    assert "fresh-draw" in protocol and "2 mask epochs" in protocol and "best validation accuracy" in protocol
    assert "fine-tuning: 1 epochs" in protocol
    out = tmp_path / "ext"
    for args in (["extract", *TINY[:4], *EXTRACT, "--model", str(run_dir / "vanilla.pt")], ["export", "--quiet"],
                 ["evaluate", "--latency-repeats", "0", "--quiet"]):
        assert main([*args, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["vanilla"]["health"] == health
    assert f"from --model {run_dir / 'vanilla.pt'}" in (out / "report.md").read_text()


def test_resume_on_another_device_keeps_the_masks(run_dir, tmp_path):
    """The device is not compared for masks.pt, as for checkpoint.pt: under torchrun each rank has its own
    (cuda:LOCAL_RANK) and rank 0 recorded cuda:0; rank 1 re-extracting alone would run other collectives."""
    out = tmp_path / "other-device"
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns(".bise.lock"))
    manifest = json.loads((out / "run.json").read_text())
    manifest["artefacts"]["masks.pt"]["settings"]["device"] = "cuda:0"
    (out / "run.json").write_text(json.dumps(manifest))
    stamp = (out / "masks.pt").stat().st_mtime_ns
    assert main(["run", *TINY, "--latency-repeats", "0", "--out", str(out), "--resume"]) == 0
    assert (out / "masks.pt").stat().st_mtime_ns == stamp


def test_a_folded_export_is_set_against_the_vanilla_folded_too(tmp_path):
    """weights_removed set a --fold-bn export (its BatchNorms folded into the convs) against the vanilla with
    its BatchNorm weights and biases: a subnetwork of every unit (--budget 1) "removed" them. The vanilla
    is counted folded too: nothing removed is 0."""
    out = tmp_path / "folded"
    assert main(["run", "--data", "colored-digits", "--arch", "simple-cnn", "--width", "0.25", "--vanilla-epochs", "1",
                 "--mask-epochs", "1", "--head-epochs", "0", "--budget", "1", "--fold-bn", "--latency-repeats", "0",
                 "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["subnetwork"]["units_pruned"] == 0.0
    assert report["subnetwork"]["params"] < report["vanilla"]["params"]  # the folded BatchNorms
    assert report["subnetwork"]["weights_removed"] == 0.0


def test_run_with_a_budget_counts_the_gated_units_once(run_dir, tmp_path):
    """run --model --budget counted the units the extraction gates (a deepcopy and a traced forward) twice:
    before anything is written, then again in its extraction of the same model."""
    module = sys.modules["bise.extract"]  # bise.extract is the function
    with mock.patch.object(module, "gated_units", wraps=module.gated_units) as counted:
        assert main(["run", *TINY[:4], *EXTRACT, "--model", str(run_dir / "vanilla.pt"), "--budget", "0.5",
                     "--latency-repeats", "0", "--out", str(tmp_path / "budget")]) == 0
    assert counted.call_count == 1
    assert json.loads((tmp_path / "budget" / "report.json").read_text())["subnetwork"]["units_pruned"] == 0.5
