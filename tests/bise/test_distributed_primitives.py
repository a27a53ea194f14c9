"""torch.distributed glue on 2 CPU processes (gloo, loopback): gathered terms and summed gradients
reproduce the single-process global-batch computation."""

import gc
import os
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _dist import free_port
from torch import nn

from bise import distributed as bd
from bise.checkpoint import save_atomic
from bise.data.types import Split
from bise.recipes import RECIPES
from bise.train import fit, seeded


def _objective(p_all: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A batch-level (non-separable) term, like the MI estimator: depends on all rows at once."""
    joint = torch.softmax(p_all @ w, dim=1)
    return (joint.mean(0) * torch.log(joint.mean(0))).sum()


class _TwoArgs(Exception):
    """An exception that pickling cannot rebuild (its constructor takes two arguments)."""

    def __init__(self, what, value):
        super().__init__(f"{what}={value}")


def _raised(error) -> tuple:
    try:
        bd.raise_any(error)
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return type(exc).__name__, str(exc), getattr(exc, "__notes__", [])
    return ("no error",)


def _dropout_pattern() -> torch.Tensor:
    """Which inputs the dropout of a vanilla training's first step zeroed on this rank (its 8 rows of a
    global batch of 16), flattened: trained as train_vanilla trains, every rank seeded alike."""
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(12, 2))
    zeroed = []
    model[1].register_forward_hook(lambda m, i, out: zeroed.append((out == 0).flatten()))
    g = torch.Generator().manual_seed(1)
    split = Split(torch.randint(1, 256, (16, 3, 2, 2), dtype=torch.uint8, generator=g),
                  torch.randint(0, 2, (16,), generator=g), torch.randint(0, 2, (16,), generator=g))
    with seeded(0, "cpu"):
        fit(model, split, RECIPES["mlp"], epochs=1, batch_size=16, lr=0.1, seed=0, quiet=True)
    return zeroed[0]


def _worker(rank, world, port, data, result_queue, scratch):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    ctx = bd.init("cpu", timeout_s=60)
    x, w0 = data
    w = w0.clone().requires_grad_()
    g = torch.Generator().manual_seed(5)
    for local, global_n in bd.local_batches(x.shape[0], 7, g, ctx):
        rows = bd.all_gather_rows(x[local] * 1.0)
        local_loss = (x[local] @ w).square().sum() / global_n
        (local_loss + _objective(rows, w) / ctx.world_size).backward()
    bd.all_reduce_grads([w])
    counts = bd.all_reduce_sum(torch.tensor([len(bd.local_share(torch.arange(10), ctx))]))
    # an error that rank 1 alone met: every rank raises it, rank 0 as a RuntimeError (not picklable as is)
    raised = [_raised(_TwoArgs("bad", 3) if rank == 1 else None), _raised(ValueError(f"rank {rank}"))]
    # fewer rows than processes: rank 1's share is empty (refused before, where one process ran)
    small = bd.shard_rows(1, lambda idx: idx.double() * 10, 4).tolist()
    same_dropout = bd.all_gather_rows(_dropout_pattern()[None]).unique(dim=0).shape[0] == 1
    try:  # a save path per rank: rank 0's file alone would be written
        save_atomic(torch.zeros(1), Path(scratch) / f"rank{rank}.pt")
        per_rank_save = "saved"
    except ValueError as exc:
        per_rank_save = str(exc)
    group = weakref.ref(dist.group.WORLD)
    bd.barrier()
    bd.shutdown()
    gc.collect()
    # freed, its gloo threads joined: not left to the interpreter's exit (an optimizer was built after init)
    freed = group() is None
    if ctx.is_main:
        result_queue.put((w.grad.numpy().copy(), int(counts), raised, small, same_dropout,
                          per_rank_save, freed))  # numpy: a tensor's storage dies with the sender


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    torch.manual_seed(0)
    x, w0 = torch.randn(23, 4, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    w = w0.clone().requires_grad_()
    g = torch.Generator().manual_seed(5)
    for batch in bd.global_batches(23, 7, g):
        ((x[batch] @ w).square().sum() / batch.numel() + _objective(x[batch], w)).backward()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, (x, w0), queue, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    grad, count, raised, small, same_dropout, per_rank_save, freed = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert count == 10 and small == [0.0]
    assert freed  # bd.shutdown() freed the group (torch.distributed.nn, imported after init, held it)
    assert not same_dropout  # each rank its own dropout masks (they were the same: every rank seeded alike)
    assert "processes see different save paths" in per_rank_save and "collective" in per_rank_save
    assert raised[0] == ("RuntimeError", "_TwoArgs: bad=3", ["(rank 1 met this error; every process stops with it)"])
    assert raised[1] == ("ValueError", "rank 0", [])  # the lowest rank's error, its own on rank 0
    torch.testing.assert_close(torch.from_numpy(grad), w.grad, rtol=1e-12, atol=1e-12)


def test_single_process_functions_are_identities():
    ctx = bd.current()
    assert ctx.world_size == 1 and ctx.is_main
    x = torch.randn(3, 2, requires_grad=True)
    assert bd.all_gather_rows(x) is x
    assert torch.equal(bd.local_share(torch.arange(5), ctx), torch.arange(5))
