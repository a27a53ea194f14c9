"""bise/checkpoint.py: atomic writes leave a plainly created file and no debris; reads refuse what they lack."""

import os
import stat

import pytest
import torch

from bise.checkpoint import CheckpointError, load_checkpoint, replace_atomic, save_atomic


def test_a_saved_file_has_the_permissions_of_a_plainly_created_one(tmp_path):
    """mkstemp makes 0600 files: a checkpoint shared with a group (or read by another user) would be unreadable."""
    old = os.umask(0o022)
    try:
        path = save_atomic({"a": torch.ones(2)}, tmp_path / "c.pt")
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "c.pt"
    save_atomic({"epoch": 1}, path)

    def broken(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomic(path, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert load_checkpoint(path, required=("epoch",))["epoch"] == 1
    with pytest.raises(CheckpointError, match=r"lacks \['masks'\]"):
        load_checkpoint(path, required=("epoch", "masks"))


def test_a_file_that_is_not_a_dict_is_named(tmp_path):
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt holds a list, not a dict"):
        load_checkpoint(tmp_path / "list.pt", required=("format",))
