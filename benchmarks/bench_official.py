"""Per-epoch cost of the official BISE code beside ours, on the same machine, model and data.

The official implementation (github.com/ivanluizmatos/BISE) is not part of this project: this file
is glue only. It imports the official modules from ``--official-dir`` (or ``$BISE_OFFICIAL_DIR``),
a folder holding its ``src/`` package, and copies nothing of them; without that folder it prints
one line and exits 0. docs/workflow.md says how the folder was made and gives the figures.

For each arch, one model (ours, untrained, seed 0) is copied weight for weight into the official
one, and both loops see the same data: the training split of the benchmark cut to ``--train``
images, its validation and test splits. Rounds are interleaved in one process (official, ours,
official, ...), one torch thread on the CPU, deterministic algorithms on (both codes turn them on).

* official: its per-epoch functions called directly on batches drawn from a seeded permutation
  (the same batch size as ours), from float images made once, i.e. without its DataLoader and
  transforms: ``pretrain_PH(mode='vanilla')`` (head pre-training epoch), ``train_PH_prune`` (mask
  epoch), ``pretrain_PH(mode='pruned')`` (head refit epoch), ``test`` on the validation split
  (the selection) and, reported apart, ``test`` on the training and test splits (its per-epoch
  logging, which ours does not do).
* ours: ``bise.extract.extract`` with ``mask_epochs`` epochs and the paper's 50 head epochs per
  phase; per-epoch seconds from ``sub.info["timing_seconds"]`` (a head phase's one pass to compute
  the features is spread over its 50 epochs; the frozen-prefix cache, once per run, is reported
  apart).

``python benchmarks/bench_official.py --official-dir DIR --arch mlp --arch simple-cnn --rounds 3
--out benchmarks/results/workflow/official-cpu-<date>-<commit>.json``; ``--device cuda`` on a GPU
(data and models on the device, timers synchronised; scripts/gpu_workflow.sh runs it when the
official files are carried in ``.official/``), ``--dry-run`` the wiring in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Optional

import torch
from torch import nn

from bise.extract import _synchronize  # the device sync of extract()'s phase timers

OFFICIAL_COMMIT = "689a34d10bdd2c2ff4e19a0a684f85a6ad08b062"
# arch -> (benchmark, batch size of both codes: the official's for that benchmark)
SETTINGS = {"mlp": ("colored-mnist", 256), "simple-cnn": ("biased-mnist:rho=0.997", 100)}
HEAD_EPOCHS = 50  # per head phase, the paper's (and both codes' default)
PHASES = ("mask_epoch", "head_pretraining_epoch", "head_refit_epoch", "evaluation")


def official_modules(path: str, device: torch.device) -> SimpleNamespace:
    """The official modules, imported from ``path`` (the folder that holds its ``src/`` package)."""
    sys.path.insert(0, path)
    import src.components as components
    import src.losses as losses
    import src.masked_models as masked_models
    import src.train_eval_functions as train_eval
    import src.train_mask_and_aux_classifier as train_mask

    # MaskLayer's parameters go to "cuda:0" unless told otherwise (its default argument)
    defaults = list(components.MaskLayer.__init__.__defaults__)
    defaults[1] = str(device)
    components.MaskLayer.__init__.__defaults__ = tuple(defaults)
    return SimpleNamespace(components=components, losses=losses, models=masked_models, train_eval=train_eval,
                           train_mask=train_mask)


class Batches:
    """The official loops' loader: (x, y, b) batches of a split in a seeded random order, already
    float and on ``device`` (its DataLoader's transforms and host-to-device copies are not timed)."""

    def __init__(self, split, batch_size: int, seed: int = 0, shuffle: bool = True, device="cpu"):
        self.x, self.y, self.b = (t.to(device) for t in (split.inputs(torch.arange(len(split))), split.y.long(),
                                                         split.b.long()))
        self.batch_size, self.shuffle = batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=self.generator) if self.shuffle else torch.arange(len(self.y))
        for idx in order.to(self.x.device).split(self.batch_size):
            yield self.x[idx], self.y[idx], self.b[idx]


def official_model(off: SimpleNamespace, arch: str, ours: nn.Module) -> tuple[nn.Module, tuple[str, nn.Module]]:
    """The official model with our weights and masks inserted, and (name, module) of the bottleneck
    whose output its privacy head reads (a forward hook: ``Hook`` takes such a pair)."""
    state = ours.state_dict()
    if arch == "simple-cnn":
        model = off.models.SimpleConvNetPure(num_classes=10)
        mapped = {f"extracter.{3 * (i - 1) + j}.{k.split('.', 2)[2]}": v for k, v in state.items()
                  for i in range(1, 5) for j, name in enumerate((f"conv{i}", f"bn{i}"))
                  if k.startswith(f"features.{name}.")}
        mapped.update({k: v for k, v in state.items() if k.startswith("fc.")})
        model.load_state_dict(mapped)
        off.models.insert_masks_SimpleConvNet(model, tau=1.0)
        return model, ("avgpool", model.avgpool)
    model = off.models.MaskedMLP(num_class=10, tau=1.0)
    mapped = {f"feature.{3 * (i - 1)}.{k.split('.', 2)[2]}": v for k, v in state.items()
              for i in range(1, 4) if k.startswith(f"features.fc{i}.")}
    mapped.update({k: v for k, v in state.items() if k.startswith("classifier.")})
    mapped.update({k: v for k, v in model.state_dict().items() if k.endswith(".m_i")})  # its own gate scores
    model.load_state_dict(mapped)
    return model, ("feature", model.feature)


def official_args(off: SimpleNamespace, tap: tuple[str, nn.Module], model: nn.Module, rho: float,
                  device: torch.device) -> SimpleNamespace:
    """The ``args`` namespace of bise.py for a single-bias, 10-class run (its Bmnist settings)."""
    args = SimpleNamespace(dataset="Bmnist", device=device, correlation=rho, balanced_loss=1,
                           alpha=1.0, gamma=1.0, criterion=nn.CrossEntropyLoss().to(device))
    args.MI = off.losses.MI(privates=10, device=args.device)
    width = model.mask_layers[-1].m_i.numel()  # the bottleneck: the last gated layer
    args.PH = off.components.Privacy_head(tap, nn.Sequential(nn.Linear(width, 10))).to(device)
    args.mask_optimizer = off.components.mask_optimizer(model, lr_m_i=1e-2, wd=1e-4, momentum=0.9, optim="SGD")
    args.PH_optimizer = torch.optim.SGD(args.PH.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return args


def time_official(off: SimpleNamespace, arch: str, ours: nn.Module, data, batch_size: int,
                  device: torch.device) -> dict:
    """Seconds of one epoch of each official per-epoch function (its prints discarded)."""
    model, tap = official_model(off, arch, ours)
    model.to(device).eval()
    args = official_args(off, tap, model, data.rho, device)
    train = Batches(data.train, batch_size, device=device)
    val, test = (Batches(s, batch_size, shuffle=False, device=device) for s in (data.val, data.test))
    te, tm = off.train_eval, off.train_mask
    steps = [("head_pretraining_epoch", lambda: te.pretrain_PH(model, args, train, mode="vanilla")),
             ("mask_epoch", lambda: tm.train_PH_prune(model, args, train, balanced_loss=1, modif_MI=1)),
             ("head_refit_epoch", lambda: te.pretrain_PH(model, args, train, mode="pruned")),
             ("evaluation", lambda: te.test(model, args, val, balanced_loss=1, mode="pruned")),
             ("logging_evaluation", lambda: (te.test(model, args, train, balanced_loss=1, mode="pruned"),
                                             te.test(model, args, test, balanced_loss=1, mode="pruned")))]
    out = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for name, fn in steps:
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            out[name] = time.perf_counter() - start
    return out


def time_ours(arch: str, ours: nn.Module, data, batch_size: int, mask_epochs: int, device: torch.device) -> dict:
    """Per-epoch seconds of ``extract`` from its per-phase timers (``sub.info["timing_seconds"]``)."""
    from bise.extract import ExtractConfig, extract

    config = ExtractConfig(mask_epochs=mask_epochs, head_epochs=HEAD_EPOCHS, batch_size=batch_size,
                           mask_set="vanilla-train", seed=0, device=str(device))
    start = time.perf_counter()
    sub = extract(ours, data, config=config, quiet=True)
    wall = time.perf_counter() - start
    t = sub.info["timing_seconds"]
    refits = sum(config.temperature(e) != config.temperature(e - 1) for e in range(1, mask_epochs))
    return {"mask_epoch": t["mask_epochs"] / mask_epochs,
            "head_pretraining_epoch": t["head_pretraining"] / HEAD_EPOCHS,
            "head_refit_epoch": t["head_refits"] / (HEAD_EPOCHS * refits),
            "evaluation": t["evaluation"] / mask_epochs,
            "caches_once": t["caches"], "extract_wall": wall}


def schedule_estimate(official: dict, ours: dict) -> dict:
    """Seconds of the paper schedule (50 head pre-training epochs, 100 mask epochs, temperature halved
    every 10) from per-epoch medians: the official loop refits its head after each of the 10 halvings
    and evaluates the training, validation and test splits after every epoch; ours refits after 9
    (not after the last, which cannot change the masks), evaluates the validation split and builds its
    caches once. Ours is an upper bound: it reuses an evaluation while no mask changed."""
    head, mask = HEAD_EPOCHS, 100
    off = (head * official["head_pretraining_epoch"] + mask * official["mask_epoch"]
           + 10 * head * official["head_refit_epoch"]
           + mask * (official["evaluation"] + official["logging_evaluation"]))
    ours_s = (ours["caches_once"] + head * ours["head_pretraining_epoch"] + mask * ours["mask_epoch"]
              + 9 * head * ours["head_refit_epoch"] + mask * ours["evaluation"])
    return {"official_s": off, "official_without_logging_s": off - mask * official["logging_evaluation"],
            "ours_s": ours_s, "ratio_official_over_ours": off / ours_s,
            "ratio_without_logging": (off - mask * official["logging_evaluation"]) / ours_s}


def bench_arch(off: SimpleNamespace, arch: str, n_train: int, rounds: int, mask_epochs: int, device: torch.device,
               spec: Optional[str] = None) -> dict:
    """Interleaved rounds on ``arch``'s benchmark (``spec``: other data, e.g. a dry run's); medians."""
    from bise.data import load
    from bise.models import build_model

    spec, batch_size = spec or SETTINGS[arch][0], SETTINGS[arch][1]
    data = load(spec, seed=0)
    data = dataclasses.replace(data, train=data.train.subset(torch.arange(min(n_train, len(data.train)))))
    torch.manual_seed(0)
    ours = build_model(arch, data.num_classes, data.input_shape).eval()
    # one-time costs of the first calls in a process (autograd, kernels' first use): on two batches, not timed
    tiny = dataclasses.replace(data, train=data.train.subset(torch.arange(2 * batch_size)),
                               val=data.val.subset(torch.arange(batch_size)),
                               test=data.test.subset(torch.arange(batch_size)))
    time_official(off, arch, ours, tiny, batch_size, device)
    time_ours(arch, ours, tiny, batch_size, mask_epochs, device)
    runs = {"official": [], "ours": []}
    loads = []
    for _ in range(rounds):
        loads.append(os.getloadavg()[0])
        runs["official"].append(time_official(off, arch, ours, data, batch_size, device))
        runs["ours"].append(time_ours(arch, ours, data, batch_size, mask_epochs, device))
        print(json.dumps({arch: {k: {p: round(v, 4) for p, v in r[-1].items() if isinstance(v, float)}
                                 for k, r in runs.items()}}), file=sys.stderr, flush=True)
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
           for side, rs in runs.items()}
    phases = {p: {"official_s": med["official"][p], "ours_s": med["ours"][p],
                  "ratio_official_over_ours": med["official"][p] / med["ours"][p]} for p in PHASES}
    return {"data": spec, "train_images": len(data.train), "val_images": len(data.val),
            "test_images": len(data.test), "batch_size": batch_size, "rounds": rounds,
            "ours_mask_epochs_per_round": mask_epochs, "head_epochs_per_phase": HEAD_EPOCHS,
            "per_epoch_median": phases,
            "official_logging_evaluation_s": med["official"]["logging_evaluation"],
            "paper_schedule_estimate": schedule_estimate(med["official"], med["ours"]),
            "ours_caches_once_s": med["ours"]["caches_once"],
            "load_average_at_round_start": loads,
            "rounds_seconds": {side: [{k: v for k, v in r.items() if isinstance(v, float)} for r in rs]
                               for side, rs in runs.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official-dir", default=os.environ.get("BISE_OFFICIAL_DIR"),
                        help="folder holding the official src/ package (default: $BISE_OFFICIAL_DIR)")
    parser.add_argument("--arch", choices=list(SETTINGS), action="append", help="default: both")
    parser.add_argument("--train", type=int, action="append",
                        help="training images per arch, in --arch order (default: all 7,000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mask-epochs", type=int, default=2, help="ours per round (>= 2: one head refit)")
    parser.add_argument("--device", default="cpu", help="cpu (one thread) or cuda")
    parser.add_argument("--dry-run", action="store_true",
                        help="the wiring in seconds: simple-cnn on colored-digits (200 images), one round")
    parser.add_argument("--out", help="write the JSON here (default: stdout only)")
    args = parser.parse_args(argv)
    if not args.official_dir or not os.path.isdir(os.path.join(args.official_dir, "src")):
        print(f"official code not found (--official-dir / BISE_OFFICIAL_DIR = {args.official_dir!r}): skipped")
        return 0
    if args.rounds < 1 or args.mask_epochs < 2:
        parser.error(f"--rounds must be >= 1 and --mask-epochs >= 2, got {args.rounds} and {args.mask_epochs}")
    archs = args.arch or list(SETTINGS)
    sizes = args.train or []
    if len(sizes) > len(archs):
        parser.error(f"{len(sizes)} --train values for {len(archs)} archs")
    if args.dry_run:
        archs, sizes, args.rounds = ["simple-cnn"], [200], 1
    device = torch.device(args.device)
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (both codes set it)
    off = official_modules(args.official_dir, device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    # both codes run so (bise.py; extract(), which only warns off the CPU: some CUDA kernels have no
    # deterministic version, e.g. adaptive average pooling's backward)
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    from bench_extract import _machine  # the CPU, its cores and load
    from gpu_suite import environment  # versions, commit (BISE_COMMIT on a device), date, the GPU

    env = environment(dry_run=device.type != "cuda")
    env.update(dry_run=args.dry_run, gpu=env["gpu"] if device.type == "cuda" else None,
               threads=torch.get_num_threads())
    out = {"what": "per-epoch seconds, official BISE code vs ours (benchmarks/bench_official.py)",
           "machine": _machine(), "device": str(device), **env, "official_commit": OFFICIAL_COMMIT,
           "load_average_start": os.getloadavg(), "archs": {}}
    for i, arch in enumerate(archs):
        out["archs"][arch] = bench_arch(off, arch, sizes[i] if i < len(sizes) else 10**9, args.rounds,
                                        args.mask_epochs, device, "colored-digits" if args.dry_run else None)
    out["load_average_end"] = os.getloadavg()
    text = json.dumps(out, indent=1)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
