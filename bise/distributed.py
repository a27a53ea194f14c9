"""torch.distributed glue: one process, or data-parallel under torchrun, with the same results.

The design keeps a multi-process run equivalent to one process with the global batch:
* every rank draws the same global batch order from the seed (:func:`global_batches`) and takes
  its contiguous share of each global batch (:func:`local_share`);
* losses are sums over local samples divided by the *global* batch size, and gradients are
  summed across ranks (:func:`all_reduce_grads`), so the update equals the single-process one;
* terms defined on the whole batch (the MI estimator) see all ranks' samples through a
  differentiable, variable-size all-gather (:func:`all_gather_rows`);
* evaluation shards the data and sums exact per-group counts (:func:`all_reduce_sum`);
* rank 0 alone writes files (``current().is_main``), and every rank can resume from them; what
  each rank reads on its own must be the same on all (:func:`check_same`: a shared filesystem).
Without torchrun (no ``WORLD_SIZE``) every function is the single-process identity.
"""

from __future__ import annotations

import datetime
import importlib
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300

traffic = {"all_reduce_bytes": 0, "all_gather_bytes": 0}
"""Bytes this process sent into collectives (payloads only), for the scaling benchmark."""


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env(name: str, parse: Callable, what: str):
    """Environment variable ``name`` parsed by ``parse`` (None when unset); a bad value is a ValueError naming it."""
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not {what}") from None


def _launch() -> tuple[int, float]:
    """(world size, collective timeout in s) from the environment torchrun sets, checked before any group is joined."""
    world = _env("WORLD_SIZE", int, "an integer (torchrun sets it to the number of processes)")
    if world is None:
        if os.environ.get("RANK") is not None:  # a launcher that set half of it: every process would run alone
            raise ValueError(f"environment variable RANK={os.environ['RANK']!r} is set but WORLD_SIZE is not: launch "
                             "the processes with torchrun (which sets both), or unset RANK to run one process")
        return 1, DEFAULT_TIMEOUT_S
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE={str(world)!r} must be at least 1 (the number of processes)")
    timeout = _env("BISE_DIST_TIMEOUT", float, "a number (seconds a collective waits for the other processes)")
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"environment variable BISE_DIST_TIMEOUT={os.environ['BISE_DIST_TIMEOUT']!r} must be a "
                         "positive number of seconds")
    return world, DEFAULT_TIMEOUT_S if timeout is None else timeout


def _local_gpu(device: str) -> int:
    """The GPU of this process in a multi-process CUDA run: cuda:LOCAL_RANK, which must exist."""
    if torch.device(device).index is not None:  # set_device(LOCAL_RANK) below would silently override it
        raise ValueError(f"device {device!r} names one GPU, but each process of a multi-process run uses "
                         "cuda:LOCAL_RANK: pass device 'cuda' (and choose the GPUs with CUDA_VISIBLE_DEVICES)")
    local = _env("LOCAL_RANK", int, "an integer (torchrun sets it to the process's index on its machine)") or 0
    count = torch.cuda.device_count()
    if not 0 <= local < count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = "this machine has" if visible is None else f"this process sees (CUDA_VISIBLE_DEVICES={visible!r})"
        own = "" if count != 1 or visible is None else (
            "; or, where each process is given its own GPU (e.g. SLURM's --gpus-per-task=1), set LOCAL_RANK=0: "
            "it indexes the GPUs this process sees")
        raise ValueError(f"device {device!r}: the process with LOCAL_RANK={local} uses cuda:{local}, but {where} "
                         f"{count} CUDA device(s); start at most {count} processes per machine "
                         f"(torchrun --nproc-per-node {count}){own}")
    return local


def init(device: str = "cpu", timeout_s: Optional[float] = None) -> Context:
    """Join the process group that torchrun describes in the environment (gloo on CPU, NCCL on GPU).

    A rank that dies makes the others fail after ``timeout_s`` (env BISE_DIST_TIMEOUT, default
    300 s) instead of hanging forever. An incomplete or inconsistent environment (RANK without
    WORLD_SIZE, more processes on a machine than GPUs) is a ValueError naming it, before joining.
    """
    world, timeout = _launch()
    if world <= 1:
        return Context(device=device)
    timeout = float(timeout_s) if timeout_s is not None else timeout
    if not dist.is_initialized():
        use_cuda = device.startswith("cuda")
        if use_cuda:
            local = _local_gpu(device)
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        _import_group_defaults()
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout))
    return Context(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device)


def _import_group_defaults() -> None:
    """Import torch.distributed.nn before the group exists, so that :func:`shutdown` can free it.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated at import. Imported
    after ``init_process_group`` (torch imports it lazily, through torch._dynamo, when the first
    optimizer is built), ten defaults held the group: ``destroy_process_group`` could not free it,
    and its gloo threads and sockets (and rank 0's TCPStore server) lived on until the interpreter's
    finalization destroyed them, on each rank at its own moment, in an interpreter going away: where
    torch reports processes aborted at exit (SIGABRT, "terminate called ..."; pytorch issues 65513,
    190489). Imported first, the defaults are None."""
    importlib.import_module("torch.distributed.nn")


_alone = {"warned": False}  # whether current() warned of a torchrun launch without a group


def current() -> Context:
    """The context of this process (single-process when no group is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return Context(rank=dist.get_rank(), world_size=dist.get_world_size())
    if not _alone["warned"] and os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        _alone["warned"] = True  # once a process: bise.extract alone asks for the context hundreds of times
        warnings.warn(f"WORLD_SIZE={os.environ['WORLD_SIZE']} (a torchrun launch) but no process group: every "
                      "process runs the whole job alone; call bise.distributed.init() first", stacklevel=2)
    return Context()


def shutdown() -> None:
    """Leave the process group: its gloo/NCCL threads are joined and its sockets closed here, before
    the interpreter exits (:func:`_import_group_defaults`). Call it on every rank, after a
    :func:`barrier` when the ranks should all have finished their collectives."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def global_batches(n: int, batch_size: int, generator: torch.Generator, shuffle: bool = True) -> list[torch.Tensor]:
    """The global batches of one epoch, identical on every rank (drawn from a shared generator)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return list(order.split(batch_size))


def local_share(batch: torch.Tensor, ctx: Context) -> torch.Tensor:
    """This rank's contiguous share of a global batch (:func:`share_sizes` rows)."""
    return batch.split(share_sizes(batch.numel(), ctx.world_size))[ctx.rank]


def local_batches(n: int, batch_size: int, generator: torch.Generator, ctx: Context,
                  shuffle: bool = True) -> Iterator[tuple[torch.Tensor, int]]:
    """(local indices, global batch size) for each global batch of an epoch."""
    for batch in global_batches(n, batch_size, generator, shuffle):
        yield local_share(batch, ctx), batch.numel()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (exact for integer counts); returns ``t``."""
    if current().distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def scaled(local_mean: torch.Tensor, n_local: int, n_global: int) -> torch.Tensor:
    """A loss averaged over this rank's share, rescaled so that the sum over ranks is the global-batch mean."""
    if n_local == 0:  # an empty share: a zero that still carries the (empty) graph
        return local_mean.nan_to_num(0.0) * 0.0
    return local_mean * (n_local / n_global)


def all_reduce_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum gradients over ranks with one flat all-reduce (losses are already divided by the global batch)."""
    if not current().distributed:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    traffic["all_reduce_bytes"] += flat.numel() * flat.element_size()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks of different lengths; backward returns each rank its rows' gradient summed over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int]):
        ctx.counts, ctx.rank = counts, dist.get_rank()
        width = max(counts)
        padded = x.new_zeros((width,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        traffic["all_gather_bytes"] += padded.numel() * padded.element_size()
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start:start + ctx.counts[ctx.rank]], None


def share_sizes(n: int, world_size: int) -> list[int]:
    """Row counts of each rank's share of n rows, in rank order: as equal as possible (the first ones one
    more), and none of exactly one row when n > 1, so that the last ranks may get none. BatchNorm in
    train mode refuses one sample over a 1x1 map (MobileNetV2's last blocks): a rank given 1 of a last
    batch of 3 failed where one process with the whole batch ran. From n = 2 * world_size on, all equal
    to within one."""
    parts = min(world_size, max(1, n // 2))
    base, extra = divmod(n, parts)
    return [base + 1] * extra + [base] * (parts - extra) + [0] * (world_size - parts)


def all_gather_rows(x: torch.Tensor, counts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenate every rank's rows of ``x`` in rank order, differentiably (identity on one process).

    ``counts``: each rank's row count when known (e.g. :func:`share_sizes`), saving a round trip.
    Each rank computes the same function of the gathered rows; to get the single-process
    gradient, divide that term by the world size before backward (the gradients of the rows are
    summed over ranks here).
    """
    if not current().distributed:
        return x
    if counts is None:
        count = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        gathered = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, count)
        counts = [int(c) for c in gathered]
    return _GatherRows.apply(x, list(counts))


def shard_rows(n: int, compute: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> torch.Tensor:
    """``compute(idx)`` for all n rows, each rank doing a contiguous shard, gathered in row order; a rank
    whose share is empty (fewer rows than processes) computes on an empty index."""
    ctx = current()
    local = local_share(torch.arange(n), ctx)
    rows = torch.cat([compute(idx) for idx in local.split(batch_size)])
    return all_gather_rows(rows, share_sizes(n, ctx.world_size))


def check_same(value: str, what: str, fix: str) -> None:
    """Raise a ValueError on every rank (naming each rank's value) unless all ranks pass an equal ``value``.

    For what each rank reads on its own (a checkpoint, the lock of ``--out``): a rank that sees other
    files runs other collectives than its peers; gloo then aborts the process on a size mismatch, or
    pairs unrelated collectives (rank 0, resuming from the last epoch's checkpoint, returned without
    error while rank 1, which did not see the file, extracted from scratch).
    """
    ctx = current()
    if not ctx.distributed:
        return
    seen: list = [None] * ctx.world_size
    dist.all_gather_object(seen, value)
    if any(v != seen[0] for v in seen):
        ranks = "; ".join(f"rank {r}: {v}" for r, v in enumerate(seen))
        raise ValueError(f"the processes see different {what} ({ranks}); {fix}")


def same_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics): a training step updates them from
    the rank's own share, so that after training each rank's model computes other eval features (the
    CLI reloads rank 0's file; a script would extract from N different models)."""
    if current().distributed:
        for b in model.buffers():
            dist.broadcast(b.data, src=0)


def raise_any(error: Optional[Exception]) -> None:
    """Raise on every rank the ``error`` of the lowest rank that met one (None: this rank met none) in a step
    the ranks do on their own: rank 0 alone creating ``--out``, each rank reading its own files (an out_dir
    that is a file there, a corrupt checkpoint). Without it the failing rank leaves and the others wait at
    their next collective until ``BISE_DIST_TIMEOUT`` (or print a 'Connection closed by peer' traceback)
    instead of raising the same clear error. A rank that raises another rank's error says so in a note."""
    ctx = current()
    if ctx.distributed:
        errors: list = [None] * ctx.world_size
        dist.all_gather_object(errors, _picklable(error))
        rank = next((r for r, e in enumerate(errors) if e is not None), None)
        if rank is not None and rank != ctx.rank:
            error = errors[rank]
            error.add_note(f"(rank {rank} met this error; every process stops with it)")
    if error is not None:
        raise error


def _picklable(error: Optional[Exception]) -> Optional[Exception]:
    """``error`` if it survives pickling, else a RuntimeError with its type and message (an exception whose
    constructor takes other arguments than its message cannot be rebuilt on another rank)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any failure to round-trip
        return RuntimeError(f"{type(error).__name__}: {error}")


def quiet(quiet: bool) -> bool:
    """Whether a loop hides its progress bar: when asked to, and on every rank but 0, whose bar would
    repeat rank 0's (the values shown are reduced over the ranks)."""
    return quiet or not current().is_main


def barrier() -> None:
    if current().distributed:
        dist.barrier()
