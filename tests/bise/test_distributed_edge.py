"""Edge cases of multi-process runs (bise/distributed.py): a launch environment that is incomplete.
"""

import pytest
import torch

from bise import distributed as bd


@pytest.mark.parametrize("env, message", [
    ({"RANK": "1"}, "RANK='1' is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be at least 1"),
    ({"WORLD_SIZE": "2", "RANK": "0", "BISE_DIST_TIMEOUT": "soon"}, "BISE_DIST_TIMEOUT='soon' is not a number"),
    ({"WORLD_SIZE": "2", "RANK": "0", "BISE_DIST_TIMEOUT": "0"}, "BISE_DIST_TIMEOUT='0' must be a positive"),
])
def test_an_incomplete_launch_environment_is_named(monkeypatch, env, message):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "BISE_DIST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        bd.init("cpu")
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("device, local, message", [
    ("cuda", "2", r"LOCAL_RANK=2 .* cuda:2, but this machine has 2 CUDA device\(s\)"),
    ("cuda:1", "0", r"device 'cuda:1' names one GPU, but each process of a multi-process run uses cuda:LOCAL_RANK"),
])
def test_more_processes_than_gpus_is_named(monkeypatch, device, local, message):
    """Without the check torch.cuda.set_device fails with 'invalid device ordinal', or cuda:1 is silently cuda:0."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", local)
    monkeypatch.setenv("LOCAL_RANK", local)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda _: pytest.fail("set_device before the check"))
    with pytest.raises(ValueError, match=message):
        bd.init(device)
    assert not torch.distributed.is_initialized()
