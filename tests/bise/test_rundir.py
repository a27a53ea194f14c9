"""bise/rundir.py through its API (fast; the CLI tests cover the commands): what commit keeps or removes, and what
require refuses, so that a stale or partly written file is never read as current."""

import json

import pytest

from bise.rundir import MANIFEST, RunDir, UsageError

MAKERS = {"a.txt": "make-a", "b.txt": "make-b", "c.txt": "make-c", "d.txt": "make-d", "checkpoint.pt": "extract"}
DATA = {"spec": "colored-digits", "seed": 0, "canonical_spec": "colored-digits", "sha256": "d0"}


def _open(tmp_path, fresh=False):
    run = RunDir(tmp_path / "out", MAKERS)
    run.open(fresh=fresh)
    return run


def _make(run, name, text, inputs=(), settings=None, data=DATA, replaces=()):
    run.staging.mkdir(parents=True, exist_ok=True)
    run.staged(name).write_text(text)
    entry = run.entry(step=MAKERS[name], data=data, inputs={n: run.artefacts[n]["sha256"] for n in inputs},
                      settings=settings or {})
    run.commit({name: entry}, replaces=replaces)


def _chain(tmp_path):
    """a <- b <- c (c made from b, b from a) and d made from nothing."""
    run = _open(tmp_path)
    _make(run, "a.txt", "A", settings={"k": 1})
    _make(run, "b.txt", "B", inputs=["a.txt"])
    _make(run, "c.txt", "C", inputs=["b.txt"])
    _make(run, "d.txt", "D")
    return run


def test_a_replaced_file_removes_what_was_made_from_it_recursively(tmp_path):
    run = _chain(tmp_path)
    _make(run, "a.txt", "A2", settings={"k": 1})
    assert sorted(run.artefacts) == ["a.txt", "d.txt"]
    assert not run.has("b.txt") and not run.has("c.txt") and run.has("d.txt")
    with pytest.raises(UsageError, match="c.txt is missing; run `bise make-c"):
        run.require("c.txt", DATA)
    run.close(failed=False)


def test_the_same_bytes_made_with_other_settings_are_a_replacement(tmp_path):
    run = _chain(tmp_path)
    _make(run, "a.txt", "A", settings={"k": 1})  # the same making: what was made from it stays current
    assert sorted(run.artefacts) == ["a.txt", "b.txt", "c.txt", "d.txt"]
    _make(run, "a.txt", "A", settings={"k": 2})  # same bytes, other settings (e.g. export --round-to)
    assert sorted(run.artefacts) == ["a.txt", "d.txt"]
    assert run.artefacts["a.txt"]["settings"] == {"k": 2}
    run.close(failed=False)


def test_require_refuses_changed_bytes_other_inputs_and_other_data(tmp_path):
    run = _chain(tmp_path)
    assert run.require("c.txt", DATA) == run.path("c.txt") and run.require("a.txt", DATA) == run.path("a.txt")
    run.path("a.txt").write_text("Z")  # same size, other bytes, after run hashed it once
    with pytest.raises(UsageError, match="a.txt changed after `bise make-a` wrote it"):
        run.require("a.txt", DATA)
    assert run.require("a.txt", DATA, hashed=False)
    with pytest.raises(UsageError, match=r"b.txt was made from --data 'colored-digits' --seed 0, this command uses "
                                         r"--data 'colored-digits' --seed 1"):
        run.require("b.txt", {**DATA, "seed": 1})
    run.artefacts["b.txt"]["inputs"]["a.txt"] = "0" * 64  # b made from an earlier a (a kill between steps)
    with pytest.raises(UsageError, match="b.txt was made from another a.txt than the one in --out"):
        run.require("b.txt", DATA)
    run.close(failed=False)


def test_replaces_removes_a_file_the_step_did_not_write_again(tmp_path):
    run = _chain(tmp_path)
    _make(run, "d.txt", "D2", data={**DATA, "seed": 3}, replaces=("c.txt",))
    assert sorted(run.artefacts) == ["a.txt", "b.txt", "d.txt"] and not run.has("c.txt")
    assert run.manifest["data"] == {**DATA, "seed": 3}  # the data of the latest step
    assert json.loads(run.path(MANIFEST).read_text())["data"]["seed"] == 3
    run.close(failed=False)


def test_a_failed_command_leaves_no_record_of_a_file_it_never_wrote(tmp_path):
    run = _chain(tmp_path)
    run.record_now("checkpoint.pt", run.entry(step="extract", data=DATA, inputs={}, settings={}))
    assert "checkpoint.pt" in json.loads(run.path(MANIFEST).read_text())["artefacts"]
    run.close(failed=True)
    assert "checkpoint.pt" not in json.loads(run.path(MANIFEST).read_text())["artefacts"]
    assert _open(tmp_path).artefacts.keys() == {"a.txt", "b.txt", "c.txt", "d.txt"}


def test_a_damaged_manifest_is_refused_unless_fresh(tmp_path):
    _chain(tmp_path).close(failed=False)
    (tmp_path / "out" / MANIFEST).write_text('{"format": "bise-run-v2", "data": null, "artefacts": {"a.txt": {}}}')
    refused = RunDir(tmp_path / "out", MAKERS)
    with pytest.raises(UsageError, match="is not a run file of this version of bise"):
        refused.open()
    refused.close(failed=True)  # as the CLI does: releases the lock
    run = _open(tmp_path, fresh=True)
    assert run.artefacts == {}
    run.close(failed=False)


def test_opening_removes_what_a_killed_command_left(tmp_path):
    _chain(tmp_path).close(failed=False)
    out = tmp_path / "out"
    left = [out / ".run.json.x1.tmp", out / ".a.txt.x2.tmp", out / ".bise-new" / "b.txt"]
    left[2].parent.mkdir()
    for p in left:
        p.write_text("partial")
    (out / ".notes.tmp").write_text("not ours")
    run = _open(tmp_path)
    assert not any(p.exists() for p in left) and (out / ".notes.tmp").exists()
    run.close(failed=False)
