"""Bad input and interruptions through the real ``bise`` entry point (``python -m bise`` in a subprocess):
one line ``bise COMMAND: error: ...``, exit status 2, before any work; nothing of the run lost."""

import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _userdata import write_npz

import bise_kernels
from bise.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--data", "colored-digits", "--arch", "mlp", "--vanilla-epochs", "1", "--mask-epochs", "2", "--head-epochs",
        "1", "--latency-repeats", "0", "--quiet"]


def bise(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """``python -m bise ARGS`` with this checkout first on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "bise", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300, **kwargs)


def one_line_error(proc, command: str, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bise {command}: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("errors") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", *TINY, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def _snapshot(out: Path) -> dict:
    return {f: (out / f).read_bytes() for f in os.listdir(out) if (out / f).is_file() and f != ".bise.lock"}


@pytest.mark.parametrize("device, needle", [("cuda:7", "cuda:7"), ("gpu", "got 'gpu'"), ("meta", "cpu or cuda only")])
def test_device_is_checked_before_any_work(tmp_path, device, needle):
    out = tmp_path / "run"
    one_line_error(bise("train", "--data", "colored-digits", "--device", device, "--out", out), "train", "--device",
                   needle)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device, needle", [("cuda", "CUDA is not available"), ("mps", "cpu or cuda only")])
def test_device_in_process(tmp_path, capsys, device, needle):
    assert main(["extract", "--data", "colored-digits", "--device", device, "--out", str(tmp_path / "run")]) == 2
    assert needle in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_unwritable_out_and_cache_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(bise("train", "--data", "colored-digits", "--out", blocker / "run"), "train", "cannot be created")
    env = {"BISE_CACHE_DIR": str(blocker / "cache")}  # a folder that cannot exist: the cache cannot be written
    one_line_error(bise("train", "--data", "colored-digits:rho=0.95,n_train=40", "--out", tmp_path / "run", env=env),
                   "train", "cannot write the data cache", "BISE_CACHE_DIR")
    assert not (tmp_path / "run").exists()
    if os.geteuid() == 0:
        return  # root writes into read-only folders; the permission check itself needs an ordinary user
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    one_line_error(bise("train", "--data", "colored-digits", "--out", ro), "train", "is not writable")


def test_bias_classes_and_label_free_flag_before_training(tmp_path):
    write_npz(tmp_path / "three_bias.npz", bias_classes=3)
    start = time.monotonic()
    proc = bise("run", "--data", tmp_path / "three_bias.npz", "--arch", "mlp", "--vanilla-epochs", "100000",
                "--out", tmp_path / "run", "--quiet")
    one_line_error(proc, "run", "bias classes", "--label-free")
    assert time.monotonic() - start < 120 and not (tmp_path / "run").exists()  # 100000 epochs did not run


def test_subcommands_take_only_their_options():
    proc = bise("export", "--out", "x", "--budget", "0.3")  # argparse's own error: usage, then the error line
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("bise export: error: unrecognized arguments: --budget 0.3")
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, (name, action.option_strings)
    choices = parser._subparsers._group_actions[0].choices
    assert "--mask-epochs" not in choices["train"].format_help() and "--mask-epochs" in choices["run"].format_help()


def test_diverged_vanilla_is_not_saved(tmp_path):
    out = tmp_path / "run"
    proc = bise("train", "--data", "colored-digits", "--arch", "mlp", "--vanilla-epochs", "1", "--lr", "1e9", "--out",
                out, "--quiet")
    one_line_error(proc, "train", "non-finite weights", "diverged", "--lr")
    assert not out.exists()


def test_a_locked_out_is_refused_naming_the_holder(run_dir):
    before = _snapshot(run_dir)
    staged = run_dir / ".bise-new" / "masks.pt"  # what the holder is writing: the refused command leaves it
    with open(run_dir / ".bise.lock", "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("424242\n")
        lock.flush()
        staged.parent.mkdir()
        staged.write_bytes(b"in progress")
        try:
            one_line_error(bise("evaluate", "--out", run_dir), "evaluate",
                           "in use by another bise command (pid 424242)")
            assert staged.read_bytes() == b"in progress"
        finally:
            shutil.rmtree(staged.parent, ignore_errors=True)
    assert _snapshot(run_dir) == before


def test_files_follow_the_umask(tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = bise("train", "--data", "colored-digits:rho=0.9,n_train=50", "--arch", "mlp", "--vanilla-epochs", "0",
                "--out", out, "--quiet", env={"BISE_CACHE_DIR": str(cache)}, umask=0o027)
    assert proc.returncode == 0, proc.stderr
    files = [out / "vanilla.pt", out / "run.json", *cache.glob("*.npz")]
    assert len(files) == 3
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o640, f


def test_seed_and_data_come_from_the_run(run_dir, tmp_path, capsys):
    one_line_error(bise("evaluate", "--out", run_dir, "--seed", "3"), "evaluate", "--seed 0, not 3")
    out = tmp_path / "seeded"
    assert main(["train", "--data", "colored-digits", "--arch", "mlp", "--vanilla-epochs", "0", "--seed", "3",
                 "--out", str(out), "--quiet"]) == 0
    assert main(["extract", "--mask-epochs", "1", "--head-epochs", "0", "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert {e["data"]["seed"] for e in manifest["artefacts"].values()} == {3}


def test_relative_data_path_is_stored_resolved(tmp_path):
    (tmp_path / "a").mkdir()
    write_npz(tmp_path / "a" / "mine.npz", train=40, hw=4, seed=1)
    out = tmp_path / "run"
    proc = bise("train", "--data", "mine.npz", "--arch", "mlp", "--vanilla-epochs", "0", "--out", out, "--quiet",
                cwd=tmp_path / "a")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "run.json").read_text())["data"]["spec"] == str(tmp_path / "a" / "mine.npz")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert main(["extract", "--mask-epochs", "1", "--head-epochs", "0", "--out", "run", "--quiet"]) == 0
        assert main(["extract", "--data", "a/mine.npz", "--mask-epochs", "1", "--head-epochs", "0", "--out", "run",
                     "--quiet", "--overwrite"]) == 0  # the same file named from here: the same run
    finally:
        os.chdir(cwd)


def test_resume_says_what_it_reuses(run_dir, capsys, monkeypatch):
    assert main(["run", *TINY[:-1], "--vanilla-epochs", "30", "--pretrained", "--out", str(run_dir), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "reusing the run's vanilla.pt (epochs 1" in captured.err and "--vanilla-epochs 30" in captured.err
    assert "--pretrained True ignored" in captured.err  # the run's vanilla was trained without (none recorded)
    loads, load = [], torch.load
    monkeypatch.setattr(torch, "load",
                        lambda f, *a, **k: loads.append(Path(getattr(f, "name", f)).name) or load(f, *a, **k))
    assert main(["extract", "--mask-epochs", "2", "--head-epochs", "1", "--out", str(run_dir), "--resume"]) == 0
    assert "resuming from epoch 2 of 2" in capsys.readouterr().out
    assert loads.count("checkpoint.pt") == 1  # it was read twice: by the CLI to report it, then by extract
    monkeypatch.undo()
    assert main(["extract", "--mask-epochs", "3", "--head-epochs", "1", "--out", str(run_dir), "--resume"]) == 2
    assert "was started with other settings (mask_epochs: 2, now 3); --resume with the same options, or " \
           "--overwrite" in capsys.readouterr().err
    # bise run --overwrite would train the vanilla again: the way to new masks is bise extract --overwrite
    assert main(["run", *TINY, "--mask-epochs", "3", "--out", str(run_dir), "--resume"]) == 2
    assert f"or extract again from the run's vanilla.pt with `bise extract --out {run_dir} --overwrite` and these " \
           "extraction options" in capsys.readouterr().err


def _wait_for_training(proc) -> None:
    """Read ``proc``'s stderr until its progress bar shows the vanilla training (so the run's folder and its
    signal handling are in place). A run that ends before that fails here at the end of its stderr (the loop
    read past it, forever, once the run had printed anything, e.g. a warning)."""
    seen = ""
    while "vanilla" not in seen:
        char = proc.stderr.read(1)
        assert char, f"bise run ended (rc {proc.wait()}) before its training started: {seen[-2000:]}"
        seen += char


def test_ctrl_c_prints_one_line_with_the_resume_command(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # as from a terminal: a shell without job control starts background jobs with SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler; the child gets the default disposition back
    proc = subprocess.Popen([sys.executable, "-m", "bise", "run", *TINY[:4], "--vanilla-epochs", "100000",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_training(proc)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130
    assert "Traceback" not in rest
    assert rest.strip().splitlines()[-1] == "bise run: interrupted; nothing was changed; run the command again to redo it"
    assert not out.exists()  # the folder it created is gone


def test_sigterm_cleans_up_as_ctrl_c(tmp_path):
    """kill / timeout (SIGTERM) left the --out it had just created, holding only .bise.lock."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "bise", "run", *TINY[:4], "--vanilla-epochs", "100000",
                             "--out", str(out)], stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_training(proc)
    proc.terminate()
    rest = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143 and "Traceback" not in rest
    assert rest.strip().splitlines()[-1] == "bise run: terminated; nothing was changed; run the command again to redo it"
    assert not out.exists()


def test_the_printed_resume_command_resumes(tmp_path, capsys, monkeypatch):
    """Ctrl-C in the extraction prints a command that continues it verbatim, with the run's own options."""
    import importlib
    import shlex

    module = importlib.import_module("bise.extract")  # bise.extract is also the function
    real = module.extract

    def stop_after_epoch_1(*args, **kwargs):
        def interrupt(epoch, _record):
            if epoch == 1:
                raise KeyboardInterrupt
        return real(*args, **{**kwargs, "callback": interrupt})

    out = tmp_path / "run dir"  # a space: the command must be quoted
    # an old run with the same vanilla options first: its vanilla.pt comes out the same bytes, and the
    # old masks and checkpoint stayed (the new extraction ran staged, lost at Ctrl-C, and --resume failed)
    assert main(["run", *TINY, "--out", str(out)]) == 0
    monkeypatch.setattr(module, "extract", stop_after_epoch_1)
    assert main(["run", *TINY, "--mask-epochs", "3", "--out", str(out), "--overwrite"]) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("bise run: interrupted; continue with: bise run "), line
    monkeypatch.setattr(module, "extract", real)
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[0] == "bise" and "--overwrite" not in command and command.count("--resume") == 1
    assert sorted(json.loads((out / "run.json").read_text())["artefacts"]) == ["checkpoint.pt", "vanilla.pt"]
    earlier = torch.load(out / "checkpoint.pt", weights_only=False)["timing"]  # head pre-training and epoch 1
    assert main(command[1:]) == 0
    assert "resuming from epoch 1 of 3" not in capsys.readouterr().out  # --quiet was kept
    masks = json.loads((out / "run.json").read_text())["artefacts"]["masks.pt"]
    assert masks["settings"]["mask_epochs"] == 3
    # the extraction's seconds and phases count the part before the interruption too
    timing = masks["settings"]["result"]["timing_seconds"]
    assert timing["head_pretraining"] == earlier["head_pretraining"] > 0
    assert masks["seconds"] > sum(earlier.values()) and timing["mask_epochs"] > earlier["mask_epochs"]
    assert masks["seconds"] >= sum(timing.values())  # every phase, before the interruption and after


def test_unreadable_model_files_are_named_in_one_line(run_dir, tmp_path, capsys):
    """--model given a pickled module, a state_dict of other shapes or a folder: one line naming --model
    and what to save instead; never the advice to delete the user's file. A corrupt checkpoint.pt: one
    line saying how to start again."""
    import shutil
    from bise.models import build_model

    torch.save(build_model("mlp", 10, (3, 8, 8)), tmp_path / "module.pt")  # the whole module, not its state_dict
    torch.save(build_model("mlp", 10, (3, 28, 28)).state_dict(), tmp_path / "mlp28.pt")
    # bise's own format, damaged: a traceback (KeyError 'model_spec' / 'num_classes') with exit status 1
    torch.save({"format": "bise-vanilla-v1"}, tmp_path / "no_spec.pt")
    torch.save({"format": "bise-vanilla-v1", "model_spec": {"arch": "mlp"}, "state_dict": {}}, tmp_path / "part.pt")
    cases = [("module.pt", "state_dict"), ("mlp28.pt", "size mismatch for"), (".", "is not a file"),
             ("no_spec.pt", "is a bise-vanilla-v1 file that bise cannot rebuild a model from (spec must be a dict"),
             ("part.pt", "'num_classes' and 'input_shape', got {'arch': 'mlp'}")]
    for name, needle in cases:
        assert main(["run", *TINY, "--model", str(tmp_path / name), "--out", str(tmp_path / "run")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "--model" in lines[0] and needle in lines[0] and "delete" not in lines[0], lines
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    assert main(["extract", "--mask-epochs", "2", "--head-epochs", "1", "--out", str(out), "--resume"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "checkpoint.pt is corrupt" in lines[0] and "again with --overwrite" in lines[0], lines


def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    """--out "" (an unset shell variable) is not the current folder."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "colored-digits", "--arch", "mlp", "--vanilla-epochs", "0", "--quiet",
                 "--out", ""]) == 2
    assert "--out must name a directory, got ''" in capsys.readouterr().err and not os.listdir(tmp_path)


def test_messages_about_what_the_out_holds(run_dir, tmp_path, capsys):
    """A mistyped --out is named as holding no run (not 'pass --data'); resuming a --model run says
    where its vanilla.pt came from."""
    assert main(["evaluate", "--out", str(tmp_path / "typo")]) == 2
    assert f"--out {str(tmp_path / 'typo')!r} holds no run (no run.json records a dataset)" in capsys.readouterr().err
    args = ["run", *TINY[:2], "--model", str(run_dir / "vanilla.pt"), "--mask-epochs", "1", "--head-epochs", "0",
            "--latency-repeats", "0", "--quiet", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert main([*args[:3], *args[5:], "--resume"]) == 0
    assert f"reusing the run's vanilla.pt (from --model {run_dir / 'vanilla.pt'})" in capsys.readouterr().err


def test_changed_data_contents_are_named(tmp_path, capsys):
    """The same --data path with other contents: the error says the data changed (it printed the same
    --data and --seed twice, as if they differed)."""
    write_npz(tmp_path / "mine.npz", train=40, hw=4, seed=1)
    out = str(tmp_path / "run")
    assert main(["train", "--data", str(tmp_path / "mine.npz"), "--arch", "mlp", "--vanilla-epochs", "0", "--quiet",
                 "--out", out]) == 0
    capsys.readouterr()
    write_npz(tmp_path / "mine.npz", train=40, hw=4, seed=2)
    assert main(["extract", "--mask-epochs", "1", "--head-epochs", "0", "--quiet", "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"vanilla.pt was made from other contents of --data {str(tmp_path / 'mine.npz')!r}" in err, err


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_numbers_are_named_as_such(capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", "x", "--width", value])
    assert exc.value.code == 2 and f"--width must be a finite number > 0, got '{value}'" in capsys.readouterr().err


def test_a_corrupt_run_json_is_named_corrupt(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text('{"format": "bise-run-v2", "data": {"spec": "col')  # truncated
    assert main(["evaluate", "--out", str(tmp_path / "run")]) == 2
    assert f"{tmp_path / 'run' / 'run.json'} is corrupt (not JSON: " in capsys.readouterr().err
    # only `run --overwrite` starts over past an unreadable run.json; a one-step command's --overwrite replaces its
    # own outputs and needs the run's record
    assert main(["evaluate", "--out", str(tmp_path / "run"), "--overwrite"]) == 2
    assert f"{tmp_path / 'run' / 'run.json'} is corrupt (not JSON: " in capsys.readouterr().err


def test_ctrl_c_before_anything_changed_does_not_offer_to_resume_the_old_run(run_dir, tmp_path, capsys, monkeypatch):
    """run --overwrite stopped in the vanilla training: --resume would continue the *previous* run."""
    import importlib
    import shutil

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    monkeypatch.setattr(importlib.import_module("bise.train"), "train_vanilla", stop)
    assert main(["run", *TINY, "--vanilla-epochs", "3", "--out", str(out), "--overwrite"]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "bise run: interrupted; nothing was changed; run the command again to redo it"


def test_fresh_draw_without_a_second_draw_fails_before_training(tmp_path, capsys):
    write_npz(tmp_path / "fixed.npz", train=40, hw=4)  # no mask_x / mask_y / mask_b
    out = tmp_path / "run"
    assert main(["run", "--data", str(tmp_path / "fixed.npz"), "--arch", "mlp", "--vanilla-epochs", "1",
                 "--mask-set", "fresh-draw", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--mask-set fresh-draw needs a second draw" in err and "--mask-set vanilla-train" in err, err
    assert not out.exists()  # no vanilla trained first


def test_a_seed_beyond_64_bits_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:  # it loaded the data, then torch.manual_seed overflowed
        main(["train", "--out", "x", "--seed", str(2 ** 63)])
    assert exc.value.code == 2 and f"--seed must be <= {2 ** 63 - 1}, got '{2 ** 63}'" in capsys.readouterr().err
    assert build_parser().parse_args(["train", "--out", "x", "--seed", str(2 ** 63 - 1)]).seed == 2 ** 63 - 1
    assert build_parser().parse_args(["run", "--out", "x", "--budget", "1"]).budget == 1.0  # keep every unit


def test_a_multi_line_error_is_printed_on_one_line(tmp_path, capsys, monkeypatch):
    """Errors of torch, numpy or Pillow may span lines; the CLI prints one (`bise COMMAND: error: ...`)."""
    import bise.cli

    def fail(inv):
        raise ValueError("first line.\n\tsecond line\n")

    monkeypatch.setitem(bise.cli.HANDLERS, "train", fail)
    assert main(["train", "--data", "colored-digits", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == "bise train: error: first line.; second line\n"


def test_run_does_not_overwrite_files_that_no_run_records(tmp_path, capsys):
    """--out without run.json but with the user's own report.md: run refuses instead of replacing it."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my notes")
    assert main(["run", *TINY, "--out", str(out)]) == 2
    assert f"--out {str(out)!r} already has report.md, which no run in it records; pass --overwrite" in \
        capsys.readouterr().err
    assert (out / "report.md").read_text() == "my notes" and sorted(os.listdir(out)) == [".bise.lock", "report.md"]


@pytest.mark.parametrize("command", ["run", "evaluate"])
def test_missing_matplotlib_is_said_before_any_work(tmp_path, capsys, monkeypatch, command):
    """The report's plots import matplotlib at the end of run / evaluate; without it (a partial install of
    the [bise] extra) the command stops first, naming the extra, instead of a traceback after training."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails as if not installed
    out = tmp_path / "run"
    options = TINY if command == "run" else ["--data", "colored-digits"]
    assert main([command, *options, "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"bise {command}: error: bise needs matplotlib, from the [bise] extra: "
                                       'pip install "bise-kernels[bise]"\n')
    assert not out.exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"bise {bise_kernels.__version__}\n"


def test_resume_keeps_the_fine_tuning_where_the_export_is_redone(run_dir, tmp_path, capsys):
    """run --resume with another --round-to redid the export, which dropped finetuned.pt as made from
    the old one, and the fine-tuning was not redone: the report lost it without a word."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    assert main(["run", *TINY, "--out", str(out), "--resume", "--finetune-epochs", "1"]) == 0
    assert main(["run", *TINY, "--out", str(out), "--resume", "--round-to", "8"]) == 0
    artefacts = json.loads((out / "run.json").read_text())["artefacts"]
    assert artefacts["subnetwork.pt"]["settings"]["round_to"] == 8
    assert artefacts["finetuned.pt"]["settings"]["epochs"] == 1
    assert artefacts["finetuned.pt"]["inputs"]["subnetwork.pt"] == artefacts["subnetwork.pt"]["sha256"]
    assert "finetuned" in json.loads((out / "report.json").read_text())


def test_resume_does_not_keep_masks_of_another_model(run_dir, tmp_path, capsys):
    """Masks that `bise extract --model` made in the run's folder were kept by run --resume, whose
    report then described another model than the run's vanilla.pt."""
    out, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(run_dir, out)
    assert main(["train", *TINY[:4], "--vanilla-epochs", "2", "--quiet", "--out", str(other)]) == 0
    assert main(["extract", "--out", str(out), "--overwrite", "--model", str(other / "vanilla.pt"), "--arch", "mlp",
                 "--mask-epochs", "2", "--head-epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", *TINY, "--out", str(out), "--resume"]) == 2
    assert "is an extraction of another vanilla model than" in capsys.readouterr().err


def test_a_bad_data_spec_on_a_run_is_named_as_such(run_dir, capsys):
    """An invalid --data on an existing run was reported as "holds a run on another --data"."""
    for spec, needle in (("colored-digits:rho=2", "rho=2.0: must lie strictly between 0 and 1"),
                         ("colored-digits:foo=1", "unknown option(s) ['foo']"),
                         ("colored-digits:rho=abc", "option rho='abc' is not a valid float")):
        assert main(["evaluate", "--out", str(run_dir), "--data", spec]) == 2
        err = capsys.readouterr().err
        assert needle in err and "holds a run" not in err, err


def test_auto_means_the_default_for_every_option():
    from bise.data.spec import canonical

    assert canonical("colored-digits:rho=auto,severity=auto,n_val=auto") == canonical("colored-digits")


def test_a_run_json_of_the_wrong_shape_is_named(run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    manifest = json.loads((out / "run.json").read_text())
    for bad in ({**manifest, "data": {"spec": "colored-digits"}}, {**manifest, "data": "colored-digits"},
                {**manifest, "artefacts": {**manifest["artefacts"], "masks.pt": {"sha256": None, "step": "extract"}}}):
        (out / "run.json").write_text(json.dumps(bad))
        assert main(["evaluate", "--out", str(out)]) == 2
        assert "is not a run file of this version of bise" in capsys.readouterr().err


def test_arch_finetune_epochs_and_the_cache_are_named(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", *TINY[:2], "--arch", "MLP", "--out", str(tmp_path / "a")])
    assert "argument --arch: invalid choice: 'MLP'" in capsys.readouterr().err
    assert main(["finetune", "--out", str(run_dir), "--finetune-epochs", "0"]) == 2
    assert "--finetune-epochs 0 fine-tunes nothing" in capsys.readouterr().err
    proc = bise("run", *TINY, "--out", tmp_path / "b", env={"BISE_CACHE_DIR": "/proc/no-such-cache"})
    one_line_error(proc, "run", "cannot create the data cache /proc/no-such-cache", "BISE_CACHE_DIR")


def test_temporary_files_of_a_killed_command_are_removed(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    left = [out / ".checkpoint.pt.abc123.tmp", out / ".run.json.x.tmp"]
    mine = out / ".notes.tmp"  # not a temporary file of bise: kept
    for p in (*left, mine):
        p.write_text("partial")
    main(["evaluate", "--out", str(out)])  # any command that takes the lock (this one may find the run incomplete)
    assert not any(p.exists() for p in left) and mine.exists()


def test_a_step_made_again_with_other_settings_drops_its_reports(run_dir, tmp_path):
    """export --overwrite --round-to 1 writes the bytes of no rounding: the report, which records the
    export's settings, stayed recorded as current while run.json said round_to 1."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    assert main(["run", *TINY, "--out", str(out), "--resume"]) == 0  # complete (earlier tests changed run_dir)
    before = json.loads((out / "run.json").read_text())["artefacts"]
    assert "report.json" in before
    assert main(["export", "--out", str(out), "--overwrite", "--round-to", "1", "--quiet"]) == 0
    after = json.loads((out / "run.json").read_text())["artefacts"]
    assert after["subnetwork.pt"]["sha256"] == before["subnetwork.pt"]["sha256"]  # the same bytes
    assert "report.json" not in after and not (out / "report.json").exists()
    assert main(["export", "--out", str(out), "--overwrite", "--round-to", "1", "--quiet"]) == 0  # the same making
    assert main(["evaluate", "--out", str(out), "--latency-repeats", "0", "--quiet"]) == 0
    assert main(["export", "--out", str(out), "--overwrite", "--round-to", "1", "--quiet"]) == 0
    assert (out / "report.json").exists()  # the same step, settings and bytes: only its seconds differ


def test_the_resume_hint_under_torchrun_relaunches_with_torchrun(monkeypatch):
    """Every process of a torchrun launch resumes: the hint says torchrun ... -m bise, not bise alone."""
    import shlex
    from types import SimpleNamespace

    from bise import cli, distributed

    argv = ["run", "--out", "run dir", "--overwrite"]
    inv = SimpleNamespace(args=SimpleNamespace(command="run", resume=False), recorded_before={},
                          run=SimpleNamespace(artefacts={"vanilla.pt": {}}, unwritten=lambda: []))
    alone = shlex.join(["bise", "run", "--out", "run dir", "--resume"])
    assert cli._resume_hint(inv, argv) == "continue with: " + alone
    monkeypatch.setattr(distributed, "current", lambda: distributed.Context(rank=1, world_size=2))
    hint = cli._resume_hint(inv, argv)
    assert hint == "continue with: torchrun <the same torchrun options> -m bise run --out 'run dir' --resume", hint


def test_a_budget_that_keeps_no_unit_is_refused_before_any_work(run_dir, tmp_path, capsys, monkeypatch):
    """--budget 1e-6 keeps round(1e-6 * 300) = 0 units: refused before the vanilla training (run; with
    --overwrite the finished run was replaced first), before vanilla.pt is copied (run --model) and before
    a checkpoint is recorded (extract: run.json listed a checkpoint.pt that was never written)."""
    import bise.train

    def no_training(*args, **kwargs):
        raise AssertionError("a vanilla was trained")

    monkeypatch.setattr(bise.train, "train_vanilla", no_training)
    message = "error: --budget 1e-06 keeps round(1e-06 * 300) = 0 of the model's 300 gated units"
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    for args in (["run", *TINY, "--overwrite"], ["run", *TINY, "--overwrite", "--model", str(run_dir / "vanilla.pt")]):
        assert main([*args, "--budget", "1e-6", "--out", str(out)]) == 2, args
        assert message in capsys.readouterr().err, args
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before, args
    assert main(["run", *TINY, "--budget", "1e-6", "--out", str(tmp_path / "new")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "new").exists()
    fresh = tmp_path / "fresh"
    assert main(["extract", "--data", "colored-digits", "--model", str(run_dir / "vanilla.pt"), "--budget", "1e-6",
                 "--quiet", "--out", str(fresh)]) == 2
    assert message in capsys.readouterr().err and not fresh.exists()


def test_an_extraction_interrupted_before_its_checkpoint_says_nothing_was_changed(run_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    """Ctrl-C before the first checkpoint: the --out it created is removed, so the hint is to run the command again
    (it said to continue it with --resume)."""
    import importlib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("bise.extract"), "extract", interrupted)
    fresh = tmp_path / "fresh"
    assert main(["extract", "--data", "colored-digits", "--model", str(run_dir / "vanilla.pt"), "--quiet",
                 "--out", str(fresh)]) == 130
    err = capsys.readouterr().err.strip()
    assert err.endswith("interrupted; nothing was changed; run the command again to redo it"), err
    assert not fresh.exists()


def test_a_failed_extraction_leaves_no_record_of_an_unwritten_checkpoint(run_dir, tmp_path, capsys, monkeypatch):
    """An extraction that fails before its first checkpoint leaves run.json as it was (it listed a
    checkpoint.pt that did not exist), and removes an --out it created."""
    import importlib

    module = importlib.import_module("bise.extract")

    def fails(*args, **kwargs):
        raise ValueError("no extraction today")

    monkeypatch.setattr(module, "extract", fails)
    out = tmp_path / "run"
    assert main(["train", *TINY[:6], "--quiet", "--out", str(out)]) == 0
    manifest = (out / "run.json").read_text()
    assert main(["extract", "--out", str(out), "--mask-epochs", "2", "--head-epochs", "1"]) == 2
    assert "no extraction today" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text()) == json.loads(manifest)
    fresh = tmp_path / "fresh"
    assert main(["extract", "--data", "colored-digits", "--model", str(run_dir / "vanilla.pt"), "--quiet",
                 "--out", str(fresh)]) == 2
    assert not fresh.exists()


def test_options_a_given_model_makes_moot_are_refused(run_dir, tmp_path, capsys):
    """--width other than the model's was ignored by extract (300 units kept at --width 0.25), and run --model
    ignored the vanilla-training options without a word: each is named now, before any work."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    before = (out / "run.json").read_text()
    assert main(["extract", "--out", str(out), "--overwrite", "--width", "0.25", "--quiet"]) == 2
    assert f"error: {out / 'vanilla.pt'} holds a mlp model of --width 1.0, not --width 0.25" in capsys.readouterr().err
    model = str(run_dir / "vanilla.pt")
    assert main(["extract", "--out", str(out), "--overwrite", "--model", model, "--width", "1", "--mask-epochs", "1",
                 "--head-epochs", "0", "--quiet"]) == 0  # the model's own width is fine
    capsys.readouterr()
    before = (out / "run.json").read_text()
    assert main(["run", *TINY, "--overwrite", "--model", model, "--lr", "0.5", "--out", str(out)]) == 2
    assert "error: --vanilla-epochs, --lr train the vanilla model, which --model gives trained; drop them or --model" \
        in capsys.readouterr().err
    assert (out / "run.json").read_text() == before


def test_resume_without_a_checkpoint_never_replaces_finished_masks(run_dir, tmp_path, capsys):
    """extract --resume where checkpoint.pt is gone extracted again with the new options and replaced the
    finished masks.pt (and dropped the export and report made from it) without a word."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / "checkpoint.pt").unlink()
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["extract", "--out", str(out), "--resume", "--mask-epochs", "5", "--head-epochs", "1"]) == 2
    assert "mask_epochs: 2, now 5) and there is no checkpoint.pt to continue; pass --overwrite" in \
        capsys.readouterr().err
    assert main(["extract", "--out", str(out), "--resume", "--mask-epochs", "2", "--head-epochs", "1"]) == 0
    assert "is a finished extraction with these settings: nothing to resume" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files
    with open(out / "masks.pt", "ab") as f:  # damaged: made again (the kept one failed the export next)
        f.write(b"junk")
    assert main(["run", *TINY, "--out", str(out), "--resume"]) == 0
    assert main(["evaluate", "--out", str(out), "--latency-repeats", "0", "--quiet"]) == 0


def test_the_next_step_after_an_unfinished_extraction_is_to_resume_it(run_dir, tmp_path, capsys):
    """After a run killed in its extraction, evaluate said to run `bise extract --out X`, which then refused
    ('already has checkpoint.pt'): the hint is --resume now."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    manifest = json.loads((out / "run.json").read_text())
    for name in ("masks.pt", "subnetwork.pt", "subnetwork.json"):  # as a kill inside the extraction leaves it
        (out / name).unlink(missing_ok=True)
        manifest["artefacts"].pop(name, None)
    (out / "run.json").write_text(json.dumps(manifest))
    assert main(["evaluate", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"masks.pt is missing: the `bise extract` that checkpoint.pt holds did not finish; continue it with "
        f"`bise extract --out {out} --resume` and the options it was started with")
    assert main(["extract", "--out", str(out), "--resume", "--mask-epochs", "2", "--head-epochs", "1", "--quiet"]) == 0


@pytest.mark.parametrize("flag, value, message", [("--seed", "x", "--seed must be an integer, got 'x'"),
                                                  ("--lr", "abc", "--lr must be a number, got 'abc'")])
def test_a_value_of_the_wrong_kind_is_named_in_words(capsys, flag, value, message):
    """It said '--seed must be a int' (the Python type's name)."""
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", "x", flag, value])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_the_untrained_note_names_the_flag_only_when_given(tmp_path, capsys):
    """'trained with --lr 0.001' where no --lr was given (the recipe's rate) sent users to a flag they had not set."""
    base = ["train", "--data", "colored-digits", "--arch", "mlp", "--vanilla-epochs", "0", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert "note: the vanilla model trained with the recipe's learning rate 0.001 did not train" in \
        capsys.readouterr().err
    assert main([*base, "--lr", "0.5", "--out", str(tmp_path / "b")]) == 0
    assert "note: the vanilla model trained with --lr 0.5 did not train" in capsys.readouterr().err


def test_a_resume_that_spells_out_the_default_mask_set_continues(run_dir, tmp_path, capsys):
    """run --resume --mask-set fresh-draw after a run that left it to the default was refused ('mask_set: None,
    now 'fresh-draw''): the mask set is recorded resolved."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    assert main(["run", *TINY, "--out", str(out), "--resume"]) == 0
    assert json.loads((out / "run.json").read_text())["artefacts"]["masks.pt"]["settings"]["mask_set"] == "fresh-draw"
    assert main(["run", *TINY, "--mask-set", "fresh-draw", "--out", str(out), "--resume"]) == 0
    assert "error" not in capsys.readouterr().err


def test_infinite_weights_are_non_finite_too():
    """A diverged training can leave +-inf as well as NaN: either is refused before vanilla.pt is written."""
    from bise.cli import _finite
    from bise.rundir import UsageError

    model = torch.nn.Linear(3, 2)
    _finite(model, "the vanilla model")
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(UsageError, match=r"the vanilla model has non-finite weights \(weight\)"):
        _finite(model, "the vanilla model")


def test_a_state_dict_missing_a_weight_is_refused(tmp_path, capsys):
    """--model is loaded strictly: a state_dict missing a tensor would leave that layer at its random
    initialisation and be extracted from without a word."""
    from bise.models import build_model

    state = build_model("mlp", 10, (3, 8, 8)).state_dict()
    state.pop("classifier.bias")
    torch.save(state, tmp_path / "partial.pt")
    assert main(["run", "--data", "colored-digits", "--arch", "mlp", "--mask-epochs", "1", "--head-epochs", "0",
                 "--latency-repeats", "0", "--quiet", "--model", str(tmp_path / "partial.pt"),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "does not match architecture mlp" in err and 'Missing key(s) in state_dict: "classifier.bias"' in err


def test_evaluate_names_a_finetuned_pt_that_no_step_recorded(run_dir, tmp_path, capsys):
    """A finetuned.pt that run.json does not record (the user's own file) is named, not reported without a
    word and then removed as an output of an older fine-tuning."""
    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    assert main(["run", *TINY, "--out", str(out), "--resume"]) == 0  # complete (earlier tests changed run_dir)
    (out / "finetuned.pt").write_bytes((out / "subnetwork.pt").read_bytes())
    assert main(["evaluate", "--out", str(out), "--latency-repeats", "0", "--quiet"]) == 2
    assert "finetuned.pt is not recorded in run.json" in capsys.readouterr().err
    assert (out / "finetuned.pt").is_file()


def test_the_extraction_logs_test_metrics_only_without_a_val_split():
    """Data without a val split: the extraction logs the test metrics per epoch (the history plot's
    curves); with one it must not look at the test split."""
    import dataclasses
    from types import SimpleNamespace

    from bise.cli import _extract_config
    from bise.data import load

    args = build_parser().parse_args(["extract", "--out", "x"])
    args.seed = 0
    data = load("colored-digits")
    assert data.val is not None and _extract_config(SimpleNamespace(args=args, data=data)).log_test is False
    no_val = dataclasses.replace(data, val=None)
    assert _extract_config(SimpleNamespace(args=args, data=no_val)).log_test is True
