"""Scaling of an extraction epoch over 1, 2, 4 ... processes (bise/distributed.py), with communication volume.

    python benchmarks/scaling.py --procs 1 2 4 [--data colored-mnist --arch simple-cnn --width 0.25]

Each configuration spawns N processes (gloo on CPU, NCCL with --device cuda) that run the same
extraction with the same global batch; the time of the second mask epoch (no start-up, no head
phase) is measured on rank 0, together with the bytes each rank sent into collectives per step
(gate-score and head gradients all-reduced, MI inputs all-gathered). Writes
benchmarks/results/scaling-<device>-<date>-<commit>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from bise_kernels.info import source_commit

RESULTS = Path(__file__).resolve().parent / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, args: dict, model_path: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import bise
    from bise import distributed as bd
    from bise.extract import ExtractConfig

    torch.set_num_threads(args["threads_per_rank"])
    ctx = bd.init(args["device"])
    stamps = []
    counters = []

    def callback(epoch, record):
        if ctx.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        counters.append(dict(bd.traffic))

    data = bise.load_data(args["data"])
    config = ExtractConfig(mask_epochs=2, head_epochs=0, batch_size=args["batch_size"], device=ctx.device,
                           eval_batch_size=1024)
    bise.extract(torch.load(model_path, weights_only=False), data, config=config, quiet=True, callback=callback)
    if rank == 0:
        steps = -(-len(data.train) // args["batch_size"])
        sent = {k: (counters[1][k] - counters[0][k]) / steps for k in counters[0]}
        queue.put({"processes": world, "epoch_seconds": stamps[1] - stamps[0], "steps_per_epoch": steps,
                   "bytes_per_step_per_rank": sent})
    bd.shutdown()


def measure(world: int, args: dict, model_path: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, model_path, queue)) for r in range(world)]
    for p in procs:
        p.start()
    result = queue.get(timeout=3600)
    for p in procs:
        p.join()
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--data", default="colored-mnist")
    parser.add_argument("--arch", default="simple-cnn")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads-per-rank", type=int, default=1,
                        help="CPU threads of each process (1: processes are the unit of parallelism)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/scaling-...json)")
    a = parser.parse_args(argv)
    import bise

    data = bise.load_data(a.data)
    torch.manual_seed(0)
    model = bise.train_vanilla(data, a.arch, epochs=1, width=a.width, batch_size=a.batch_size, quiet=True)
    args = {"data": a.data, "batch_size": a.batch_size, "device": a.device, "threads_per_rank": a.threads_per_rank}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = os.path.join(tmp, "vanilla.pt")
        torch.save(model, model_path)
        rows = [measure(n, args, model_path) for n in a.procs]
    base = rows[0]["epoch_seconds"] * rows[0]["processes"]
    for row in rows:
        row["speedup"] = rows[0]["epoch_seconds"] / row["epoch_seconds"]
        row["efficiency"] = base / (row["epoch_seconds"] * row["processes"])
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    result = {"benchmark": "extraction epoch scaling", "device": device, "torch": torch.__version__,
              "python": platform.python_version(), **source_commit(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "config": {**vars(a), "train_samples": len(data.train)}, "rows": rows}
    path = Path(a.out) if a.out else RESULTS / (f"scaling-{'cuda' if a.device.startswith('cuda') else 'cpu'}-"
                                                f"{datetime.date.today()}-{result['commit']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)
    print(f"{'procs':>5} {'epoch s':>9} {'speed-up':>9} {'efficiency':>10} {'all-reduce B/step':>18} "
          f"{'all-gather B/step':>18}")
    for r in rows:
        sent = r["bytes_per_step_per_rank"]
        print(f"{r['processes']:>5} {r['epoch_seconds']:>9.3f} {r['speedup']:>9.2f} {r['efficiency']:>10.2f} "
              f"{sent['all_reduce_bytes']:>18.0f} {sent['all_gather_bytes']:>18.0f}")
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
