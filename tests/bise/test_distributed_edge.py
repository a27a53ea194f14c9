"""Edge cases of multi-process runs (bise/distributed.py): sizes that the world size does not divide,
three processes, a resume with another number of processes, processes that see different files, a
launch environment that is incomplete.

Each case ends in the single-process result or in an error on every rank within a bounded time,
never a hang: the spawned group runs under a hard timeout (BISE_DIST_TIMEOUT per collective).
"""

import contextlib
import io
import math
import os
import time
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from _dist import free_port

import bise
from bise import distributed as bd
from bise.extract import ExtractConfig
from bise.models import build_model
from bise.recipes import recipe_for
from bise.rundir import RunDir
from bise.train import fit

SPEC = "colored-digits"
# 1258 training samples = 3 * 419 + 1: the last global batch has one sample, so two of three ranks get none
CONFIG = dict(mask_epochs=2, head_epochs=1, batch_size=419, seed=0, eval_batch_size=256)
WORLD = 3


def _error(fn) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _worker(rank, port, model_path, with_ckpt, without_ckpt, corrupt, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      BISE_DIST_TIMEOUT="30")
    torch.set_num_threads(1)
    result = {}
    try:
        bd.init("cpu")
        model, data = torch.load(model_path, weights_only=False), bise.load_data(SPEC)
        # the checkpoint of epoch 1 of a one-process run, finished by three
        sub = bise.extract(model, data, config=ExtractConfig(**CONFIG), quiet=True, out_dir=with_ckpt, resume=True)
        result["scores"] = {n: s.numpy() for n, s in sub.scores.items()}  # numpy: tensors die with the sender
        result["epochs_run"] = sub.info["mask_epochs_run"]
        # rank 1 does not see the checkpoint that the others resume from (another node, a folder not shared)
        result["resume"] = _error(lambda: bise.extract(model, data, config=ExtractConfig(**CONFIG), quiet=True,
                                                       out_dir=without_ckpt if rank == 1 else with_ckpt, resume=True))
        # without resume: the ranks that see the checkpoint refuse it, rank 1 does not see one
        result["fresh"] = _error(lambda: bise.extract(model, data, config=ExtractConfig(**CONFIG), quiet=True,
                                                      out_dir=without_ckpt if rank == 1 else with_ckpt))
        # rank 1 alone meets an error reading its files: every rank raises it (it left, the others waited)
        result["corrupt"] = _error(lambda: bise.extract(model, data, config=ExtractConfig(**CONFIG), quiet=True,
                                                        out_dir=corrupt if rank == 1 else with_ckpt, resume=True))
        result["out_file"] = _error(lambda: bise.extract(model, data, config=ExtractConfig(**CONFIG), quiet=True,
                                                         out_dir=model_path if rank == 1 else with_ckpt, resume=True))
        run = RunDir(without_ckpt if rank == 1 else with_ckpt, {})
        result["out"] = _error(lambda: run.open())
        run.close(failed=True)
        run = RunDir(model_path, {})  # a file: rank 0 alone looks, every rank reports it
        result["file"] = _error(lambda: run.open())
        shown = io.StringIO()
        with contextlib.redirect_stderr(shown):  # the progress bar: rank 0's alone
            fit(model, data.train, recipe_for(data, "mlp"), epochs=1, batch_size=419, lr=0.1)
        result["bar"] = "vanilla" in shown.getvalue()
        # BatchNorm statistics come from each rank's share: after fit, every rank holds rank 0's
        torch.manual_seed(0)
        bn = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(data.input_shape), 8),
                                 torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, data.num_classes))
        fit(bn, data.train, recipe_for(data, "mlp"), epochs=1, batch_size=400, lr=0.1, quiet=True)
        result["bn"] = torch.cat([bn[2].running_mean, bn[2].running_var]).numpy()
    except Exception as exc:  # noqa: BLE001
        result["crash"] = f"{type(exc).__name__}: {exc}"
    finally:
        queue.put((rank, result))
        bd.shutdown()


class _Stop(Exception):
    pass


def _stop_after_epoch_1(epoch, record):
    if epoch == 1:
        raise _Stop


def test_three_processes_resume_one_with_odd_sizes_and_refuse_files_one_rank_lacks(tmp_path):
    data = bise.load_data(SPEC)
    assert len(data.train) % CONFIG["batch_size"] == 1
    torch.manual_seed(0)
    model = build_model("mlp", data.num_classes, data.input_shape)  # untrained: extraction runs the same
    model_path, with_ckpt, without_ckpt, corrupt = tmp_path / "model.pt", tmp_path / "a", tmp_path / "b", tmp_path / "c"
    torch.save(model, model_path)
    without_ckpt.mkdir()
    corrupt.mkdir()
    (corrupt / "checkpoint.pt").write_bytes(b"not a checkpoint")
    single = bise.extract(model, data, config=ExtractConfig(**CONFIG), quiet=True).scores
    with pytest.raises(_Stop):
        bise.extract(model, data, config=ExtractConfig(**CONFIG), quiet=True, out_dir=with_ckpt,
                     callback=_stop_after_epoch_1)

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, model_path, str(with_ckpt), str(without_ckpt),
                                                     str(corrupt), queue))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + 180
    try:
        for _ in range(WORLD):
            rank, result = queue.get(timeout=max(1.0, deadline - time.monotonic()))  # a hang fails here
            results[rank] = result
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert sorted(results) == list(range(WORLD)), results
    for rank, result in results.items():
        assert "crash" not in result, (rank, result["crash"])
        assert result["epochs_run"] == 1
        assert result["bar"] == (rank == 0)
        for name, s in single.items():  # float reduction order differs across processes
            torch.testing.assert_close(torch.from_numpy(result["scores"][name]), s, rtol=0, atol=2e-5)
            assert torch.equal(torch.from_numpy(result["scores"][name]) >= 0, s >= 0), name
        # every rank stops with the same clear error, instead of running other collectives than its peers
        assert result["resume"].startswith("ValueError") and "checkpoint of epoch 2" in result["resume"] and \
            "rank 1: no checkpoint" in result["resume"], (rank, result["resume"])
        assert result["corrupt"].startswith("CheckpointError") and str(corrupt) in result["corrupt"], \
            (rank, result["corrupt"])
        assert result["out_file"] == f"ValueError: out_dir {str(model_path)!r} is a file, not a folder", \
            (rank, result["out_file"])
        assert result["out"].startswith("ValueError") and "rank 1: not locked" in result["out"], (rank, result["out"])
        np.testing.assert_array_equal(result["bn"], results[0]["bn"])
        assert result["fresh"].startswith("ValueError") and "rank 0: a checkpoint; rank 1: no checkpoint" in \
            result["fresh"], (rank, result["fresh"])
        assert result["file"] == f"UsageError: --out {str(model_path)!r} exists and is not a directory", \
            (rank, result["file"])


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
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # the message says "this machine has" then
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda _: pytest.fail("set_device before the check"))
    with pytest.raises(ValueError, match=message):
        bd.init(device)
    assert not torch.distributed.is_initialized()


def test_one_gpu_per_process_is_told_local_rank_indexes_the_visible_gpus(monkeypatch):
    """srun --gpus-per-task=1 with LOCAL_RANK copied from SLURM_LOCALID: each process sees one GPU, as cuda:0; the
    error said "start at most 1 processes per machine", which is not the fix."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda _: pytest.fail("set_device before the check"))
    with pytest.raises(ValueError, match=r"this process sees \(CUDA_VISIBLE_DEVICES='3'\) 1 CUDA device\(s\).*"
                                         r"its own GPU .* set LOCAL_RANK=0"):
        bd.init("cuda")
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("n, world", [(2, 2), (3, 2), (9, 8), (5, 3), (1001, 8)])
def test_no_rank_gets_one_sample_of_a_larger_batch(n, world):
    """BatchNorm in train mode refuses a single sample over a 1x1 map (MobileNetV2's last blocks): with
    shares differing by at most one, a rank given 1 of a last batch of 3 failed where one process ran."""
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.BatchNorm2d(3)).train()  # as MobileNetV2 ends
    model(torch.rand(n, 3, 4, 4))  # one process, the whole batch
    shares = [bd.local_share(torch.arange(n), bd.Context(rank=r, world_size=world)) for r in range(world)]
    assert torch.equal(torch.cat(shares), torch.arange(n))
    assert [len(s) for s in shares] == bd.share_sizes(n, world)
    assert max(len(s) for s in shares) - min(len(s) for s in shares) <= (1 if n >= 2 * world else n)
    for share in shares:
        if len(share):
            model(torch.rand(len(share), 3, 4, 4))


def test_share_sizes_give_the_first_ranks_the_extra_rows():
    assert bd.share_sizes(5, 2) == [3, 2] and bd.share_sizes(7, 3) == [3, 2, 2] and bd.share_sizes(3, 4) == [3, 0, 0, 0]
    shares = [bd.local_share(torch.arange(7), bd.Context(rank=r, world_size=3)) for r in range(3)]
    assert [s.tolist() for s in shares] == [[0, 1, 2], [3, 4], [5, 6]]


def test_an_empty_share_scales_to_a_zero_loss_and_zero_gradients():
    """A rank with no rows of a batch averages over nothing (NaN); its scaled loss must be 0 and its gradients
    0, not NaN: the all-reduce would spread a NaN to every rank's weights."""
    w = torch.ones(3, requires_grad=True)
    loss = bd.scaled((torch.zeros(0, 3) * w).sum(1).mean(), 0, 4)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(w.grad, torch.zeros(3))
    assert bd.scaled(torch.tensor(2.0), 1, 4).item() == 0.5


def test_a_torchrun_launch_without_init_warns_once(monkeypatch):
    """A script under torchrun that forgot bise.distributed.init() ran the whole job in every process."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(bd._alone, "warned", False)
    with pytest.warns(UserWarning, match=r"WORLD_SIZE=2 \(a torchrun launch\) but no process group"):
        assert bd.current().world_size == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bd.current()
