"""BISE extraction: learn structured gates on a frozen vanilla model (docs/method.md sections 2-7, 9).

``extract(model, data, config=ExtractConfig())`` returns a :class:`~bise.subnetwork.Subnetwork`.
Schedule (section 6): head pre-training (gates off) -> mask epochs, each batch doing
forward; L_r, I, CE_aux; zero mask grads; backward(alpha L_r + gamma I); zero head grads;
backward(CE_aux on detached z); step masks; step head. After each epoch: validation accuracy of the
pruned model (best kept, ties to the later epoch); temperature halvings spread evenly over
``mask_epochs`` (every 10 epochs at the default 100), each followed by a head refit on the pruned
model; stop after the epoch at which tau <= tau_stop. A checkpoint is written after pre-training
and after every epoch; ``resume=True`` continues from it bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from bise_kernels import global_topk_masks

from . import distributed, losses, validate
from .batching import DeviceSplit, to_device
from .checkpoint import CheckpointError, load_checkpoint, require_keys, save_atomic
from .data.maskset import PROTOCOLS as MASK_SETS
from .data.maskset import mask_data
from .evaluate import predict
from .feature_cache import BottleneckTap, FrozenPrefix
from .gated_chain import GatedChain
from .gates import find_bottleneck, gates_of, insert_gates, remove_gates, set_gate_mode
from .heads import set_head_grads
from .mask_loss import objective_and_grad
from .sgd import sgd_step
from .subnetwork import Subnetwork
from .models import reinitialize
from .recipes import recipe_for
from .train import fit, seeded

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "bise-extract-checkpoint-v1"
RESUME_IGNORED = ("device",)  # settings that may differ between a run and its resumption


def _is_number(v) -> bool:
    """An int or float, not a bool (True is an int to Python, never a learning rate or a fraction)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class ExtractConfig:
    """Every setting of an extraction; defaults are the paper's (docs/method.md section 7)."""

    mask_epochs: int = 100
    head_epochs: int = 50
    batch_size: Optional[int] = None  # None: the dataset's paper batch size (100 BiasedMNIST-like, else 256)
    mask_lr: float = 1e-2
    mask_momentum: float = 0.9
    mask_weight_decay: float = 1e-4
    head_lr: float = 0.1
    head_momentum: float = 0.9
    head_weight_decay: float = 1e-4
    alpha: float = 1.0
    gamma: float = 1.0
    tau0: float = 1.0
    tau_factor: float = 0.5
    tau_stop: float = 1e-3
    refit_after_last: bool = False  # the refit after the final halving cannot change the masks
    reweight: bool = True  # ablation: False = plain CE
    mi: bool = True  # ablation: False = no MI term
    weighting: Optional[str] = None  # None: data.weighting ("empirical-joint" with label_free)
    rho: Optional[Union[float, Sequence[float]]] = None  # None: data.rho
    label_free: bool = False
    mask_set: Optional[str] = None  # "fresh-draw" | "vanilla-train"; None: the data's default (bise.data.maskset)
    identification_epochs: int = 1
    budget: Optional[float] = None  # keep exactly this fraction of units (global top-k of the scores)
    gate_names: Optional[Sequence[str]] = None
    gate_exclude: Optional[Sequence[str]] = None
    bottleneck: Optional[str] = None
    cache_features: bool = True  # False: the straightforward loop (recompute everything)
    amp: bool = False  # bf16 autocast for the frozen network's forward passes (losses and heads in fp32)
    cache_limit_mb: float = 4096.0
    eval_batch_size: int = 1024
    log_test: bool = False  # also log test metrics every epoch (logging only, never selection)
    seed: int = 0
    device: str = "cpu"
    deterministic: bool = True

    def validate(self) -> "ExtractConfig":
        for name in ("mask_epochs", "head_epochs", "identification_epochs", "eval_batch_size"):
            v = getattr(self, name)
            low = 0 if name == "head_epochs" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {self.batch_size!r}")
        for name in ("mask_lr", "head_lr", "tau0", "tau_stop", "cache_limit_mb"):
            v = getattr(self, name)
            if not (_is_number(v) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        for name in ("alpha", "gamma", "mask_weight_decay", "head_weight_decay"):
            v = getattr(self, name)
            if not (_is_number(v) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("mask_momentum", "head_momentum"):
            v = getattr(self, name)
            if not (_is_number(v) and 0 <= v < 1):
                raise ValueError(f"{name} must be a number in [0, 1), got {v!r}")
        for name in ("refit_after_last", "reweight", "mi", "label_free", "cache_features", "amp", "log_test",
                     "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("gate_names", "gate_exclude"):
            validate.patterns(name, getattr(self, name))
        if self.bottleneck is not None and not isinstance(self.bottleneck, str):
            raise ValueError(f"bottleneck must be a module name or None, got {self.bottleneck!r}")
        if not (_is_number(self.tau_factor) and 0 < self.tau_factor < 1):
            raise ValueError(f"tau_factor must be a number in (0, 1), got {self.tau_factor!r}")
        if self.tau_stop >= self.tau0:
            raise ValueError(f"tau_stop ({self.tau_stop}) must be below tau0 ({self.tau0})")
        lowest, tiny = self.tau0 * self.tau_factor ** self.halvings, torch.finfo(torch.float32).tiny
        if lowest < tiny:  # the gates' slopes sigmoid'(s/T)/T then overflow: NaN scores mid-run
            raise ValueError(f"tau_stop={self.tau_stop!r} takes the temperature to {lowest:.3g}, below float32's "
                             f"smallest normal number {tiny:.3g}; give a larger tau_stop")
        if self.rho is not None:
            pair = isinstance(self.rho, (list, tuple))
            values = list(self.rho) if pair else [self.rho]
            if (pair and len(values) != 2) or not all(_is_number(r) and 0 < r < 1 for r in values):
                raise ValueError(f"rho must be a number in (0, 1), or two of them (two biases), or None, got "
                                 f"{self.rho!r}")
        if self.label_free and self.weighting not in (None, "empirical-joint"):
            raise ValueError(f"label_free=True weights by the empirical joint of the pseudo labels; weighting="
                             f"{self.weighting!r} would be ignored (leave it None)")
        defaults = ExtractConfig.__dataclass_fields__
        for name, off, why in (("gamma", not self.mi, "mi=False drops the mutual-information term"),
                               ("identification_epochs", not self.label_free,
                                "label_free=False trains no identification model")):
            if off and getattr(self, name) != defaults[name].default:
                raise ValueError(f"{why}; {name}={getattr(self, name)!r} would be ignored (leave it at "
                                 f"{defaults[name].default!r})")
        if self.budget is not None and not (_is_number(self.budget) and 0 < self.budget <= 1):
            raise ValueError(f"budget must be a fraction in (0, 1] of units to keep, got {self.budget!r}")
        if self.mask_set is not None and self.mask_set not in MASK_SETS:
            raise ValueError(f"mask_set must be one of {MASK_SETS} or None, got {self.mask_set!r}")
        if self.weighting is not None and self.weighting not in losses.SCHEMES:
            raise ValueError(f"weighting must be one of {losses.SCHEMES} or None, got {self.weighting!r}")
        validate.seed(self.seed)
        return self

    @property
    def halvings(self) -> int:
        """How many temperature halvings reach tau_stop (10 at the defaults)."""
        return math.ceil(math.log(self.tau_stop / self.tau0) / math.log(self.tau_factor) - 1e-9)

    def temperature(self, epoch: int) -> float:
        """tau after ``epoch`` mask epochs: halvings spread evenly, all done by ``mask_epochs``."""
        return self.tau0 * self.tau_factor ** (epoch * self.halvings // self.mask_epochs)


@dataclass
class _Labels:
    """Targets, bias labels (pseudo ones in the label-free variant) and their derived quantities."""

    y: Tensor
    b: Tensor  # (N,) or (N, num_biases)
    b_true: Optional[Tensor]

    @property
    def b2(self) -> Tensor:
        return self.b if self.b.dim() == 2 else self.b[:, None]


def _split_bias(split, name: str, data, label_free: bool) -> Optional[Tensor]:
    b = getattr(split, "b", None)
    if b is None:
        if label_free:
            return None
        raise ValueError(f"bias labels are missing from the {name} split; BISE needs the training set's bias "
                         "labels (or use label_free=True for pseudo labels from an identification model)")
    if b.shape[0] != len(split.y) or b.dim() not in (1, 2):
        raise ValueError(f"{name}.b must be (N,) or (N, num_biases) with N = {len(split.y)}, got {tuple(b.shape)}")
    if b.numel() and (int(b.min()) < 0 or int(b.max()) >= data.num_bias_classes):
        raise ValueError(f"{name}.b holds labels outside [0, num_bias_classes={data.num_bias_classes})")
    return b.long()


def _check_data(data, config: ExtractConfig) -> None:
    if getattr(data, "train", None) is None or len(data.train) == 0:
        raise ValueError("data.train is missing or empty")
    for name in ("train", "val"):  # a hand-made split's class beyond num_classes failed in a reshape
        split = getattr(data, name, None)
        if split is not None and len(split) and int(split.y.max()) >= data.num_classes:
            raise ValueError(f"data.{name}.y holds class {int(split.y.max())}, but data.num_classes is "
                             f"{data.num_classes}")
    validate.same_bias_classes(data, config.label_free)


def _identification_model(model: nn.Module, data, config: ExtractConfig, quiet: bool) -> nn.Module:
    """Same architecture, fresh weights, ``identification_epochs`` of ERM with the data's recipe (section 9)."""
    recipe = recipe_for(data, model)
    with seeded(config.seed, config.device):
        ident = reinitialize(copy.deepcopy(model))
        for p in ident.parameters():
            p.requires_grad_(True)
        return fit(ident, data.train, recipe, epochs=config.identification_epochs,
                   batch_size=config.batch_size or recipe["batch_size"], lr=recipe["lr"], seed=config.seed,
                   device=config.device, quiet=quiet, desc="identification model")


class _Run:
    """One extraction's mutable state and its loops (kept together so checkpoints can capture it)."""

    def __init__(self, model: nn.Module, data, config: ExtractConfig, quiet: bool, bottleneck: str):
        self.config, self.data, self.quiet = config, data, quiet
        self.device = torch.device(config.device)
        self.model = model
        self.gates = gates_of(model)
        self.bottleneck_name = bottleneck
        self.bottleneck = model.get_submodule(bottleneck)
        self.batch_size = config.batch_size or recipe_for(data, model)["batch_size"]
        self.generator = torch.Generator().manual_seed(config.seed)
        self.fingerprint = _fingerprint(model, data)
        self.prefix: Optional[FrozenPrefix] = None
        self.cached: dict[str, Tensor] = {}
        self.history: list[dict] = []
        self.best: dict = {"accuracy": None, "epoch": None, "scores": None}
        self.epoch = 0
        self.pseudo_bias: Optional[dict] = None
        self.dist = distributed.current()
        self.splits: dict[str, DeviceSplit] = {}
        self.timing: dict[str, float] = {}
        self.memo: dict[str, tuple[bytes, Tensor]] = {}
        self.chain: Optional[GatedChain] = None  # set by build_chain

    def split(self, key: str) -> DeviceSplit:
        """Split ``key`` (train / val / test) on the device, made once per run."""
        if key not in self.splits:
            self.splits[key] = DeviceSplit({"train": self.data.train, "val": self.data.val,
                                            "test": self.data.test}[key], self.device)
        return self.splits[key]

    def autocast(self):
        """bf16 autocast for the frozen forward passes when ``config.amp`` (a no-op otherwise)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp)

    @contextmanager
    def clock(self, phase: str):
        """Add the wall clock of the block to ``timing[phase]`` (the device is synchronised at both ends)."""
        _synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize(self.device)
            self.timing[phase] = self.timing.get(phase, 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------ labels and weights

    def set_labels(self, train_b: Tensor, val_b: Optional[Tensor], weighting: str, num_bias_classes: int) -> None:
        data, config = self.data, self.config
        self.train = _Labels(data.train.y.long(), train_b, getattr(data.train, "b", None))
        self.val = None
        if data.val is not None and len(data.val):
            self.val = _Labels(data.val.y.long(), val_b, getattr(data.val, "b", None))
        self.num_bias_classes = num_bias_classes
        self.weighting = weighting
        self.device_labels: Optional[tuple] = None  # made by labels_on_device
        rho = config.rho if config.rho is not None else getattr(data, "rho", None)
        if weighting == "symmetric-rho" and rho is None:
            raise ValueError("weighting 'symmetric-rho' needs rho (config.rho or data.rho)")
        if config.rho is not None and weighting in losses.COUNT_SCHEMES:
            raise ValueError(f"rho={config.rho!r} would be ignored: weighting {weighting!r} counts the groups "
                             "(rho serves 'symmetric-rho' and 'two-bias')")
        validate.two_bias_rho(data, weighting, config.rho)
        if weighting == "two-bias" and train_b.dim() != 2:
            raise ValueError("weighting 'two-bias' needs two bias labels per sample (b of shape (N, 2))")
        if weighting != "two-bias" and train_b.dim() != 1:
            raise ValueError(f"weighting {weighting!r} needs one bias label per sample, got b of shape "
                             f"{tuple(train_b.shape)}")
        self.rho = rho
        self.table = losses.weight_table(weighting, num_classes=data.num_classes, rho=rho, targets=self.train.y,
                                         bias=train_b if train_b.dim() == 1 else None,
                                         num_bias_classes=num_bias_classes)

    # ------------------------------------------------------------------ forward passes

    def prepare_caches(self) -> None:
        """Cache the frozen prefix of every split the run forwards (train, val, test with log_test).

        While the prefix is active its modules are stubs, so a split that is not cached could not be
        forwarded at all: every split used during the run must be in the cache.
        """
        if not self.config.cache_features:
            return
        splits = {"train": self.data.train}
        if self.val is not None:
            splits["val"] = self.data.val
        if self.config.log_test:
            splits["test"] = self.data.test
        n_total = sum(len(s) for s in splits.values())
        example = self.split("train").inputs(torch.arange(min(8, len(self.data.train))))
        self.prefix = FrozenPrefix.build(self.model, example, n_total, self.config.cache_limit_mb * 2**20)
        if self.prefix is None:
            return
        batch = self.config.eval_batch_size
        for key in splits:
            s = self.split(key)
            with self.autocast():
                self.cached[key] = distributed.shard_rows(
                    len(s), lambda idx, s=s: self.prefix.compute(lambda j: s.inputs(idx[j]), len(idx), batch), batch)

    def forward(self, key: str, idx: Tensor) -> Tensor:
        """The model's logits for samples ``idx`` of split ``key`` (from the prefix cache when there is one)."""
        with self.autocast():
            if key in self.cached:
                return self.prefix.run(self.cached[key].index_select(0, to_device(idx, self.device)))
            return self.model(self.split(key).inputs(idx))

    def frozen(self, name: str, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, a pass of the frozen network, reused while the gates' hard masks are unchanged.

        Such a pass depends on nothing else (frozen weights, eval mode), so a head refit or an
        evaluation after an epoch that changed no mask reuses the last result exactly. Only with
        ``cache_features``: the straightforward loop recomputes everything.
        """
        if not self.config.cache_features:
            return compute()
        gates = list(self.gates.values())
        key = torch.cat([g.mask() for g in gates]).cpu().numpy().tobytes() if gates[0].enabled else b"off"
        if name in self.memo and self.memo[name][0] == key:
            return self.memo[name][1]
        value = compute()
        self.memo[name] = (key, value)
        return value

    @torch.no_grad()
    def features(self) -> Tensor:
        """Bottleneck features of every training sample under the current gates (sharded over ranks)."""
        return self.frozen("features", self._features)

    def _features(self) -> Tensor:
        tap = BottleneckTap(self.bottleneck)

        def compute(idx: Tensor) -> Tensor:
            self.forward("train", idx)
            return tap.take().float()

        try:
            return distributed.shard_rows(len(self.train.y), compute, self.config.eval_batch_size)
        finally:
            tap.close()

    @torch.no_grad()
    def predictions(self, key: str) -> Tensor:
        """Predicted classes of every sample of split ``key``, gathered on the device and read once."""
        return distributed.shard_rows(len(self.split(key)), lambda idx: self.forward(key, idx).argmax(1),
                                      self.config.eval_batch_size).cpu()

    # ------------------------------------------------------------------ the two training loops

    def head_phase(self, desc: str) -> None:
        """``head_epochs`` of CE(head(z), b) with the gates fixed (vanilla before epoch 1, pruned after).

        With ``cache_features`` the features of the whole training split are computed once and every
        step is :func:`bise.heads.set_head_grads` on them (no network pass, no autograd graph; the
        same gradients); the straightforward loop runs the network and autograd at every step.
        """
        if self.config.head_epochs == 0:
            return
        set_gate_mode(self.gates, "vanilla" if self.epoch == 0 else "pruned")
        cached = self.features() if self.config.cache_features else None
        tap = None if cached is not None else BottleneckTap(self.bottleneck)
        split, b2 = self.split("train"), to_device(self.train.b2, self.device)
        params = list(self.heads.parameters())
        scales: dict[float, Tensor] = {}
        try:
            for _ in tqdm(range(self.config.head_epochs), desc=desc, unit="epoch", disable=self.quiet, leave=False):
                for idx, n_global in split.indices(self.batch_size, self.generator, self.dist):
                    if cached is not None:
                        scale = len(idx) / n_global
                        if scale not in scales:
                            scales[scale] = torch.full((), scale, device=self.device)
                        set_head_grads(self.heads, cached.index_select(0, idx), b2.index_select(0, idx),
                                       scales[scale])
                    else:
                        with torch.no_grad():
                            self.forward("train", idx)
                        z = tap.take().float()
                        loss = distributed.scaled(self.aux_loss(z, b2.index_select(0, idx)), len(idx), n_global)
                        self.head_opt.zero_grad(set_to_none=True)
                        loss.backward()
                    distributed.all_reduce_grads(params)
                    self.optimizer_step(self.head_opt)
        finally:
            if tap is not None:
                tap.close()

    def optimizer_step(self, optimizer: torch.optim.SGD) -> None:
        """``optimizer.step()``; with ``cache_features`` through :func:`bise.sgd.sgd_step` (the same update)."""
        if self.config.cache_features:
            sgd_step(optimizer)
        else:
            optimizer.step()

    def aux_loss(self, z: Tensor, b2: Tensor) -> Tensor:
        return sum(F.cross_entropy(head(z.detach()), b2[:, k]) for k, head in enumerate(self.heads))

    def mask_epoch(self) -> dict:
        """One epoch of the section 5 step over shuffled training batches; returns mean losses."""
        keys = ("train_loss", "reweighted_ce", "mi", "aux_loss")
        totals = distributed.all_reduce_sum(self.mask_steps())
        return {k: float(v) / len(self.train.y) for k, v in zip(keys, totals.tolist())}

    def mask_steps(self) -> Tensor:
        """The steps of :meth:`mask_epoch`; returns this rank's sums of the four losses on the device.

        No host synchronisation: labels, indices and sums stay on the device. With the prefix
        cached and a chain-shaped model, the network part of each step runs through
        :class:`~bise.gated_chain.GatedChain`, the default objective through
        :func:`~bise.mask_loss.objective_and_grad` and the head gradients through
        :func:`~bise.heads.set_head_grads` (the ATen calls autograd would make, bit for bit).
        """
        set_gate_mode(self.gates, "masked")
        chain = self.chain
        tap = BottleneckTap(self.bottleneck) if chain is None else None
        # the objective's gradient without autograd (bise.mask_loss) covers the default objective
        plain_objective = (len(self.heads) == 1 and self.dist.world_size == 1 and self.config.reweight
                           and self.config.mi)
        b2 = self.labels_on_device()[2]
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        batches = self.split("train").indices(self.batch_size, self.generator, self.dist)
        scales: dict[float, Tensor] = {}
        try:
            for idx, n_global in tqdm(batches, desc=f"mask epoch {self.epoch + 1}", unit="batch",
                                      disable=self.quiet, leave=False):
                if chain is None:
                    logits = self.forward("train", idx).float()
                    z = tap.take().float()
                    objective, lr_, mi = self.mask_objective(logits, z, idx, n_global)
                    aux = distributed.scaled(self.aux_loss(z, b2[idx]), len(idx), n_global)
                    for s in self.scores:
                        s.grad = torch.zeros_like(s)
                    objective.backward()
                    distributed.all_reduce_grads(self.scores)
                    self.head_opt.zero_grad(set_to_none=True)
                    aux.backward()
                else:
                    z = chain.forward(self.cached["train"].index_select(0, idx))
                    if plain_objective:
                        y, b, _, table = self.labels_on_device()
                        objective, lr_, mi, grad_z = objective_and_grad(
                            z, chain.head, self.heads[0], y[idx], b[idx], b2[idx], table, self.num_bias_classes,
                            self.config.alpha, self.config.gamma)
                    else:
                        z.requires_grad_()
                        objective, lr_, mi = self.mask_objective(chain.logits(z), z, idx, n_global)
                        grad_z, = torch.autograd.grad(objective, z)
                    for s in self.scores:
                        s.grad = torch.zeros_like(s)
                    chain.backward(grad_z)
                    distributed.all_reduce_grads(self.scores)
                    scale = len(idx) / n_global
                    if scale not in scales:
                        scales[scale] = torch.full((), scale, device=self.device)
                    aux = distributed.scaled(set_head_grads(self.heads, z.detach(), b2.index_select(0, idx),
                                                            scales[scale]), len(idx), n_global)
                distributed.all_reduce_grads(list(self.heads.parameters()))
                self.optimizer_step(self.mask_opt)
                self.optimizer_step(self.head_opt)
                totals += torch.stack([objective, lr_, mi, aux]).detach().double() * n_global
        finally:
            if tap is not None:
                tap.close()
        return totals

    def mask_objective(self, logits: Tensor, z: Tensor, idx: Tensor, n_global: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(alpha L_r + gamma I, L_r, I)`` of one batch: ``logits`` and bottleneck features ``z`` of samples ``idx``."""
        config, world = self.config, self.dist.world_size
        y, b, b2, table = self.labels_on_device()
        yb = y[idx]
        if config.reweight:
            lr_ = losses.reweighted_cross_entropy(logits, yb, b[idx], group_weights=table)
        else:
            lr_ = F.cross_entropy(logits, yb)
        lr_ = distributed.scaled(lr_, len(idx), n_global)
        mi = logits.new_zeros(())
        if config.mi:  # defined on the global batch: every rank sees all ranks' samples
            heads = len(self.heads)
            packed = torch.cat([head(z) for head in self.heads] + [yb[:, None].to(z.dtype), b2[idx].to(z.dtype)],
                               dim=1)
            packed = distributed.all_gather_rows(packed, distributed.share_sizes(n_global, world))
            k_ = self.num_bias_classes
            y_all = packed[:, heads * k_].long()
            for k in range(heads):
                b_all = packed[:, heads * k_ + 1 + k].long()
                mi = mi + losses.mutual_information(packed[:, k * k_:(k + 1) * k_], b_all, k_,
                                                    sample_mask=y_all != b_all) / world
        return config.alpha * lr_ + config.gamma * mi, lr_, mi

    def labels_on_device(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The training split's y, b, b2 and the weight table on the device (copied once per run)."""
        if self.device_labels is None:
            self.device_labels = tuple(to_device(t, self.device)
                                       for t in (self.train.y, self.train.b, self.train.b2, self.table))
        return self.device_labels

    def build_chain(self) -> None:
        """The mask step's :class:`GatedChain` when the prefix is cached (None: autograd runs the network)."""
        self.chain = None
        if self.prefix is None or self.config.amp or "train" not in self.cached:
            return
        set_gate_mode(self.gates, "masked")
        with self.prefix:
            self.chain = GatedChain.build(self.model, self.prefix, self.bottleneck, self.cached["train"][:8])

    def init_trainables(self) -> None:
        """Scores at 0 and tau0; fresh heads (one per bias) on the bottleneck; the two SGD optimisers."""
        config = self.config
        with torch.no_grad():
            for g in self.gates.values():
                g.scores.zero_()
                g.temperature = config.tau0
        tap = BottleneckTap(self.bottleneck)
        try:
            with torch.no_grad():
                self.model(self.split("train").inputs(torch.arange(1)))
            dim = tap.take().shape[1]
        finally:
            tap.close()
        with seeded(config.seed, self.device):  # the heads' initialisation; the caller's RNG is left alone
            self.heads = nn.ModuleList(nn.Linear(dim, self.num_bias_classes) for _ in range(self.train.b2.shape[1]))
        self.heads.to(self.device)
        self.scores = [g.scores for g in self.gates.values()]
        self.mask_opt = torch.optim.SGD(self.scores, lr=config.mask_lr, momentum=config.mask_momentum,
                                        weight_decay=config.mask_weight_decay)
        self.head_opt = torch.optim.SGD(self.heads.parameters(), lr=config.head_lr, momentum=config.head_momentum,
                                        weight_decay=config.head_weight_decay)

    # ------------------------------------------------------------------ masks, evaluation, state

    def masks_from(self, scores: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.config.budget is None:
            return {n: s >= 0 for n, s in scores.items()}
        return dict(zip(scores, global_topk_masks(list(scores.values()), self.config.budget)))

    def current_scores(self) -> dict[str, Tensor]:
        return {n: g.scores.detach().clone() for n, g in self.gates.items()}

    @torch.no_grad()
    def evaluate(self, key: str, masks: dict[str, Tensor], labels: Optional[_Labels]) -> tuple[float, dict]:
        """Accuracy and METRICS of the pruned model with ``masks`` on split ``key``."""
        from .evaluate import metrics_from_predictions

        saved = self.current_scores()
        set_gate_mode(self.gates, "pruned")
        for name, g in self.gates.items():
            g.scores.copy_(torch.where(masks[name], 1.0, -1.0))
        try:
            pred = self.frozen(f"predictions {key}", lambda: self.predictions(key))
        finally:
            for name, g in self.gates.items():
                g.scores.copy_(saved[name])
        split = {"val": self.data.val, "test": self.data.test}[key]
        y = split.y.long()
        b = labels.b_true if labels is not None and labels.b_true is not None else getattr(split, "b", None)
        accuracy = float((pred == y).float().mean())
        return accuracy, (metrics_from_predictions(pred, y, b) if b is not None else {"accuracy": accuracy})

    def after_epoch(self, losses_: dict) -> dict:
        scores = self.current_scores()
        masks = self.masks_from(scores)
        record = {"epoch": self.epoch, "temperature": self.config.temperature(self.epoch - 1), **losses_,
                  "val": None, "val_accuracy": None,
                  "units_kept": {n: int(m.sum()) for n, m in masks.items()}}
        if self.val is not None:
            acc, metrics = self.evaluate("val", masks, self.val)
            record["val"], record["val_accuracy"] = metrics, acc
            if self.best["accuracy"] is None or acc >= self.best["accuracy"]:
                self.best = {"accuracy": acc, "epoch": self.epoch, "scores": scores}
        if self.config.log_test:
            record["test"] = self.evaluate("test", masks, None)[1]
        self.history.append(record)
        return record

    def state(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(self.config), "epoch": self.epoch,
                "scores": self.current_scores(), "heads": self.heads.state_dict(),
                "mask_opt": self.mask_opt.state_dict(), "head_opt": self.head_opt.state_dict(),
                "best": self.best, "history": self.history,
                "rng": {"generator": self.generator.get_state()},
                "pseudo_bias": self.pseudo_bias, "gate_names": list(self.gates), "timing": dict(self.timing),
                "fingerprint": self.fingerprint, "done": self.epoch >= self.config.mask_epochs}

    def load_state(self, ckpt: dict, path: Path) -> None:
        saved = {k: v for k, v in ckpt["config"].items() if k not in RESUME_IGNORED}
        now = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in RESUME_IGNORED}
        if _jsonish(saved) != _jsonish(now):
            diff = sorted(k for k in set(saved) | set(now) if _jsonish(saved.get(k)) != _jsonish(now.get(k)))
            raise ValueError(f"checkpoint {path} was written with different settings ({diff}); resume with the "
                             "same configuration or start a new run")
        if ckpt["gate_names"] != list(self.gates):
            raise ValueError(f"checkpoint {path} has gates {ckpt['gate_names'][:3]}..., this model "
                             f"{list(self.gates)[:3]}...: not the same model")
        if ckpt.get("fingerprint", self.fingerprint) != self.fingerprint:  # none: written by an older bise
            raise ValueError(f"checkpoint {path} is an extraction of another model or other data (their "
                             "fingerprints differ): resume with the model and data it started with, or start a new "
                             "run")
        with torch.no_grad():
            for name, g in self.gates.items():
                g.scores.copy_(ckpt["scores"][name])
                g.temperature = self.config.temperature(ckpt["epoch"])
        self.heads.load_state_dict(ckpt["heads"])
        self.mask_opt.load_state_dict(ckpt["mask_opt"])
        self.head_opt.load_state_dict(ckpt["head_opt"])
        self.best, self.history, self.epoch = ckpt["best"], ckpt["history"], ckpt["epoch"]
        self.timing = dict(ckpt.get("timing", {}))  # the phases' seconds before the resume (none: older checkpoint)
        self.generator.set_state(ckpt["rng"]["generator"])


def _fingerprint(model: nn.Module, data) -> str:
    """sha256 of what an extraction starts from: the frozen model's tensors (not its gates' scores, which
    the extraction learns), and of the mask set and the val split their labels and 64 inputs spread over each;
    a checkpoint resumed on another vanilla of the same architecture or on other data continued as its own."""
    h = hashlib.sha256()
    scores = {id(g.scores) for g in gates_of(model).values()}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) not in scores:
            h.update(name.encode() + str(t.dtype).encode() + _bytes(t))
    for split in (data.train, data.val):  # where the masks learn, where their epoch is chosen
        if split is not None and len(split):
            picked = torch.linspace(0, len(split) - 1, min(64, len(split))).long()
            for t in (split.y, getattr(split, "b", None), split.inputs(picked)):
                if t is not None:
                    h.update(str(tuple(t.shape)).encode() + _bytes(t))
    return h.hexdigest()


def _bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()  # bf16 has no numpy type


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _jsonish(v):
    if isinstance(v, (list, tuple)):
        return [_jsonish(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonish(x) for k, x in v.items()}
    return v


def _labels(run: "_Run", ckpt: Optional[dict], vanilla_train=None) -> None:
    """Bias labels for the run: the data's, or the identification model's predictions (label-free).

    ``vanilla_train``: the vanilla's training split where the masks learn on another (fresh-draw); the
    label-free variant then predicts its labels too (``pseudo_bias["vanilla_train"]``), the ones
    fine-tuning uses: the mask set's labels belong to other images.
    """
    data, config, device = run.data, run.config, run.device
    if not config.label_free:
        train_b = _split_bias(data.train, "train", data, False)
        val_b = _split_bias(data.val, "val", data, True) if data.val is not None and len(data.val) else None
        run.set_labels(train_b, val_b, config.weighting or data.weighting, data.num_bias_classes)
        return
    splits = {"train": data.train, "val": data.val if data.val is not None and len(data.val) else None}
    if vanilla_train is not None:
        splits["vanilla_train"] = vanilla_train
    run.pseudo_bias = dict(ckpt["pseudo_bias"]) if ckpt is not None and ckpt.get("pseudo_bias") is not None else {}
    missing = [k for k in splits if k not in run.pseudo_bias]  # all, or one a checkpoint of an older version lacks
    if missing:
        ident = _identification_model(model_without_gates(run.model), data, config, run.quiet)
        for k in missing:
            run.pseudo_bias[k] = None if splits[k] is None else predict(
                ident, splits[k], batch_size=config.eval_batch_size, device=device)
    run.set_labels(run.pseudo_bias["train"], run.pseudo_bias["val"], "empirical-joint", data.num_classes)


def _gate(model: nn.Module, config: ExtractConfig, example: Tensor) -> Optional[str]:
    """Insert the extraction's gates into ``model`` (in place, unless it has them); return the bottleneck."""
    bottleneck = find_bottleneck(model, config.bottleneck, example)  # once: insert_gates and the run use it
    if not gates_of(model):
        insert_gates(model, config.gate_names, exclude=config.gate_exclude, example_input=example,
                     temperature=config.tau0, bottleneck=bottleneck, arg_names=("gate_names", "gate_exclude"))
    elif config.gate_names is not None or config.gate_exclude is not None:
        names = list(gates_of(model))
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        raise ValueError(f"gate_names / gate_exclude choose where extract inserts gates, but the model has gates "
                         f"already ({shown}): pass the model without them, or leave both None")
    return bottleneck


def _example(data) -> Tensor:
    """Two training inputs (on the CPU): what gate insertion and the bottleneck search trace the model on."""
    return data.train.inputs(torch.arange(min(2, len(data.train))))


def gated_units(model: nn.Module, data, config: ExtractConfig) -> int:
    """How many units the extraction of ``model`` (left as it is) gates: what ``config.budget`` is a share of.
    The CLI checks the budget with it before training a vanilla model (an untrained one counts the same)."""
    model = copy.deepcopy(model).cpu().eval()
    _gate(model, config, _example(data))
    return sum(g.scores.numel() for g in gates_of(model).values())


def check_budget(budget: Optional[float], units: int, name: str = "budget=") -> None:
    """A budget whose top-k keeps no unit is refused (the top-k would keep 1 unit regardless)."""
    if budget is not None and round(budget * units) < 1:
        raise ValueError(f"{name}{budget!r} keeps round({budget!r} * {units}) = 0 of the model's {units} gated "
                         f"units; give at least {1 / units:.3g} (one unit)")


def prepare_run(model: nn.Module, data, config: ExtractConfig, quiet: bool = True, ckpt: Optional[dict] = None,
                ckpt_path: Optional[Path] = None, vanilla_train=None) -> _Run:
    """An extraction ready for its first phase: a frozen gated copy of ``model``, labels, heads, caches
    (``vanilla_train``: as :func:`_labels`).

    :func:`extract` runs the schedule on it; benchmarks time single phases with it (enter
    ``run.prefix``, when there is one, before calling ``run.head_phase`` or ``run.mask_epoch``).
    """
    device = torch.device(config.device)
    model = copy.deepcopy(model).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    bottleneck = _gate(model, config, _example(data).to(device))
    check_budget(config.budget, sum(g.scores.numel() for g in gates_of(model).values()))
    run = _Run(model, data, config, quiet, bottleneck)
    _labels(run, ckpt, vanilla_train)
    run.init_trainables()
    if ckpt is not None:
        run.load_state(ckpt, ckpt_path)
    with run.clock("caches"):
        run.prepare_caches()
        run.build_chain()
    return run


def read_checkpoint(path) -> dict:
    """The extraction checkpoint at ``path``: :func:`~bise.checkpoint.load_checkpoint` with the keys and
    format :func:`extract` needs (:class:`~bise.checkpoint.CheckpointError` otherwise)."""
    return _extraction_checkpoint(load_checkpoint(path), f"checkpoint {path}")


def _extraction_checkpoint(ckpt, what: str) -> dict:
    """``ckpt`` (read from the file, or given as ``checkpoint=``: ``what``) if it has the keys and format
    :func:`extract` resumes from: a dict of another kind failed later on a missing key."""
    require_keys(ckpt, ("format", "config", "epoch", "scores", "heads", "mask_opt", "head_opt", "best", "history",
                        "rng", "gate_names"), what)
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{what} is not an extraction checkpoint (format {ckpt['format']!r})")
    return ckpt


def extract(model: nn.Module, data, *, config: Optional[ExtractConfig] = None, out_dir=None, resume: bool = False,
            quiet: bool = False, callback: Optional[Callable[[int, dict], None]] = None,
            checkpoint: Optional[dict] = None) -> Subnetwork:
    """Find the unbiased subnetwork of a vanilla ``model`` on ``data`` (a bise.data BiasedDataset).

    The model is copied (the caller's stays untouched), frozen and kept in eval mode. Gates go
    where :func:`bise.gates.insert_gates` puts them (``config.gate_names`` / ``gate_exclude``) unless the
    model already has gates (then both must be None). Masks and
    head learn on the mask set of ``config.mask_set`` (:func:`bise.data.mask_data`).
    ``out_dir``: where ``checkpoint.pt`` is written after pre-training and every epoch;
    ``resume=True`` continues from it (an existing checkpoint without ``resume`` is refused).
    ``callback(epoch, record)`` runs after each epoch's checkpoint (an exception stops the run).
    ``checkpoint``: with ``resume``, the content of ``out_dir``'s checkpoint already read by the caller
    (:func:`read_checkpoint`; the CLI reads it to report it), so that it is not read a second time.
    """
    config = validate.extract_config(config)
    validate.dataset(data)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be a function of (epoch, record) or None, got {type(callback).__name__}")
    vanilla_train = data.train
    data, mask_set = mask_data(data, config.mask_set)
    vanilla_train = None if data.train is vanilla_train else vanilla_train  # the split fine-tuning uses
    _check_data(data, config)
    validate.model_fits(model, data)
    ckpt_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    ckpt, other, error = None, False, None
    try:  # each rank reads its own filesystem: every rank raises the error that one meets
        if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
            raise ValueError(f"out_dir {str(out_dir)!r} is a file, not a folder")
        if checkpoint is not None and not (resume and ckpt_path is not None and ckpt_path.exists()):
            raise ValueError("checkpoint= is the content of out_dir's checkpoint, read to resume it: it needs "
                             "resume=True and out_dir holding that checkpoint")
        ckpt = None if checkpoint is None else _extraction_checkpoint(
            checkpoint, "checkpoint= (what read_checkpoint(out_dir / 'checkpoint.pt') returns)")
        other = ckpt is None and ckpt_path is not None and ckpt_path.exists()
        if other and resume:
            ckpt = read_checkpoint(ckpt_path)
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        error = exc
    distributed.raise_any(error)
    # before the refusal below, which a rank that alone sees the checkpoint would raise alone
    distributed.check_same("no checkpoint" if ckpt is None and not other else
                           "a checkpoint" if ckpt is None else f"checkpoint of epoch {ckpt['epoch']}",
                           f"out_dir {str(out_dir)!r}", "every process must read the same out_dir: put it on a "
                           "filesystem that all machines share")
    if other and not resume:
        raise ValueError(f"{ckpt_path} holds another extraction; pass resume=True to continue it or use a "
                         "fresh out_dir")
    device, quiet = torch.device(config.device), distributed.quiet(quiet)
    with ExitStack() as stack:
        if config.deterministic:
            previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
            # warn_only off the CPU: a kernel without a deterministic version warns instead of failing the run
            torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
            stack.callback(lambda: torch.use_deterministic_algorithms(previous[0], warn_only=previous[1]))
        run = prepare_run(model, data, config, quiet, ckpt, ckpt_path, vanilla_train)
        model = run.model
        if run.prefix is not None:
            stack.enter_context(run.prefix)

        def checkpoint():
            if ckpt_path is not None:
                save_atomic(run.state(), ckpt_path)

        if ckpt is None:
            with run.clock("head_pretraining"):
                run.head_phase("head pre-training")
            checkpoint()
        first_epoch = run.epoch + 1
        epochs = tqdm(range(first_epoch, config.mask_epochs + 1), desc="BISE mask epochs", unit="epoch",
                      disable=quiet)
        for epoch in epochs:
            tau_before = config.temperature(epoch - 1)
            with run.clock("mask_epochs"):
                epoch_losses = run.mask_epoch()
            run.epoch = epoch
            with run.clock("evaluation"):
                record = run.after_epoch(epoch_losses)
            tau = config.temperature(epoch)
            if tau != tau_before:
                for g in run.gates.values():
                    g.temperature = tau
                if epoch < config.mask_epochs or config.refit_after_last:
                    with run.clock("head_refits"):
                        run.head_phase(f"head refit (tau={tau:.3g})")
            with run.clock("checkpoints"):
                checkpoint()
            epochs.set_postfix(loss=f"{record['train_loss']:.3f}", tau=f"{tau:.3g}",
                               val=None if record["val_accuracy"] is None else f"{record['val_accuracy']:.3f}")
            if callback is not None:
                callback(epoch, record)
        final = run.best["scores"] if run.best["scores"] is not None else run.current_scores()
        masks = run.masks_from(final)
        with torch.no_grad():
            for name, g in run.gates.items():
                g.scores.copy_(final[name] if config.budget is None else torch.where(masks[name], 1.0, -1.0))
        set_gate_mode(run.gates, "pruned")
    info = {"weighting": run.weighting, "rho": run.rho, "batch_size": run.batch_size,
            "best_epoch": run.best["epoch"], "best_val_accuracy": run.best["accuracy"],
            "selection": "best validation accuracy" if run.val is not None else "last epoch",
            "prefix_cached": run.prefix is not None, "final_refit_skipped": not config.refit_after_last,
            "label_free": config.label_free, "bottleneck": run.bottleneck_name,
            "mask_set": mask_set, "mask_epochs_run": config.mask_epochs + 1 - first_epoch,
            "timing_seconds": dict(run.timing)}
    return Subnetwork(model, run.gates, masks, scores=final, history=run.history, config=config, info=info,
                      pseudo_bias=run.pseudo_bias)


def model_without_gates(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its Gated modules replaced by their activations."""
    return remove_gates(copy.deepcopy(model))


__all__ = ["CHECKPOINT_NAME", "ExtractConfig", "extract", "prepare_run", "read_checkpoint"]
