"""GPU suite cases for the BISE workflow's phases (benchmarks/gpu_suite.py, docs/gpu_suite.md).

One case per phase of ``bise run --data biased-mnist:rho=0.997 --arch simple-cnn``, on data of
that benchmark's shapes (7,000 training and 1,000 validation images of 3 x 28 x 28, 10 classes;
timings do not depend on the pixel values, so the images are random and no data files are
needed), each beside the loop it replaces:

* ``workflow_vanilla_step``: one SGD step of the SimpleConvNet on a batch of 100 drawn on the
  device; baseline: the same step fed from the host (``Split.inputs`` + copy). Target 2 ms.
* ``workflow_mask_epoch``: one mask epoch (70 steps) with the frozen prefix cached; baseline:
  the straightforward epoch (``cache_features=False``). Target 0.3 s.
* ``workflow_head_phase_10_epochs``: a head phase of 10 epochs: the features of the training
  split once, then autograd-free steps on them; baseline: the straightforward phase (network
  forward + autograd per step). The paper schedule has 11 phases of 50 epochs.
* ``workflow_evaluation``: the pruned model's predictions on the validation split.

The cases run without ``torch.use_deterministic_algorithms`` (``extract`` turns it on). The whole
schedule is timed by scripts/gpu_workflow.sh (``bise run``, per phase in report.json).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from bise.batching import DeviceSplit
from bise.data.types import BiasedDataset, Split
from bise.extract import ExtractConfig, prepare_run
from bise.models import build_model

SIZES = {"train": 7000, "val": 1000, "test": 2000}
DRY_SIZES = {"train": 60, "val": 20, "test": 20}
HEAD_EPOCHS = 10


def workflow_data(sizes: dict, image: int = 28, classes: int = 10, seed: int = 0) -> BiasedDataset:
    """Random data of the biased-mnist shapes (rho 0.997 bias labels: y == b for 99.7%)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        y = torch.randint(0, classes, (n,), generator=g)
        b = torch.where(torch.rand(n, generator=g) < 0.997, y, torch.randint(0, classes, (n,), generator=g))
        return Split(torch.randint(0, 256, (n, 3, image, image), generator=g, dtype=torch.uint8), y, b)

    return BiasedDataset("biased-mnist-shapes", split(sizes["train"]), split(sizes["val"]), split(sizes["test"]),
                         classes, classes, 1, 0.997, "symmetric-rho", "biased-mnist-shapes")


def _vanilla_cases(data: BiasedDataset, device: torch.device, width: float) -> list[dict]:
    torch.manual_seed(0)
    model = build_model("simple-cnn", data.num_classes, data.input_shape, width=width).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    split = DeviceSplit(data.train, device)
    idx_host = torch.randperm(len(split))[:100]
    idx = idx_host.to(device)

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return [{"name": "workflow_vanilla_step/simple-cnn", "backend": device.type, "target_us": 2000.0,
             "fn": lambda: step(split.inputs(idx), split.y.index_select(0, idx)),
             "baselines": {"host-fed step": lambda: step(data.train.inputs(idx_host).to(device),
                                                          data.train.y[idx_host].to(device))}}]


def _extraction_cases(data: BiasedDataset, device: torch.device, width: float) -> list[dict]:
    torch.manual_seed(0)
    model = build_model("simple-cnn", data.num_classes, data.input_shape, width=width).eval()
    config = ExtractConfig(mask_epochs=100, head_epochs=HEAD_EPOCHS, device=str(device))
    cached = prepare_run(model, data, config)
    plain = prepare_run(model, data, dataclasses.replace(config, cache_features=False))
    if cached.prefix is None:
        raise RuntimeError("the simple-cnn's frozen prefix was not cached")
    masks = cached.masks_from(cached.current_scores())

    def in_prefix(fn):
        def run():
            with cached.prefix:
                return fn()
        return run

    return [
        {"name": "workflow_mask_epoch/simple-cnn", "backend": device.type, "target_us": 300_000.0,
         "fn": in_prefix(cached.mask_steps), "baselines": {"straightforward epoch": plain.mask_steps}},
        {"name": f"workflow_head_phase_{HEAD_EPOCHS}_epochs/simple-cnn", "backend": device.type,
         "fn": in_prefix(lambda: cached.head_phase("head")),
         "baselines": {"straightforward head phase": lambda: plain.head_phase("head")}},
        {"name": "workflow_evaluation/simple-cnn", "backend": device.type,
         "fn": in_prefix(lambda: cached.evaluate("val", masks, cached.val)),
         "baselines": {"straightforward evaluation": lambda: plain.evaluate("val", masks, plain.val)}},
    ]


def gpu_cases(dry_run: bool = False) -> list[dict]:
    """The workflow cases on the GPU, or tiny CPU cases with ``dry_run``."""
    device = torch.device("cpu" if dry_run else "cuda")
    data = workflow_data(DRY_SIZES if dry_run else SIZES, image=8 if dry_run else 28)
    width = 0.25 if dry_run else 1.0
    return _vanilla_cases(data, device, width) + _extraction_cases(data, device, width)


__all__ = ["gpu_cases", "workflow_data"]
