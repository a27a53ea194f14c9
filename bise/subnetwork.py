"""Subnetwork: the result of an extraction (the gated model, its masks, scores and history).

It evaluates, exports and fine-tunes by delegating to bise.evaluate / bise.export / bise.finetune,
and saves / loads itself atomically (a built-in architecture is rebuilt from its model_spec).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from .checkpoint import load_checkpoint, save_atomic
from .gates import gates_of, insert_gates, set_gate_mode

FORMAT = "bise-subnetwork-v1"


class Subnetwork:
    """``.model`` (gated, frozen, eval, gates in "pruned" mode), ``.gates``, ``.masks`` (name -> bool),
    ``.scores`` (the learned scores the masks came from), ``.history`` (per-epoch records),
    ``.config`` (the ExtractConfig or its dict), ``.info`` (weighting, selection, best epoch, ...),
    ``.pseudo_bias`` (pseudo bias labels of the label-free variant, else None: {"train", "val"} of the
    mask set, and "vanilla_train", of the vanilla's training split, where the masks learned on another)."""

    def __init__(self, model: nn.Module, gates: dict, masks: dict[str, Tensor], *, scores: dict[str, Tensor],
                 history: list, config, info: Optional[dict] = None, pseudo_bias: Optional[dict] = None):
        self.model, self.gates, self.masks, self.scores = model, gates, masks, scores
        self.history, self.config, self.info = history, config, dict(info or {})
        self.pseudo_bias = pseudo_bias

    @property
    def units_total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    @property
    def units_kept(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def units_pruned(self) -> float:
        """Fraction of gate units removed (the paper code's "units pruned")."""
        return 1.0 - self.units_kept / self.units_total

    def _input_shape(self) -> tuple:
        spec = getattr(self.model, "bise_spec", None)
        if not isinstance(spec, dict):
            raise ValueError("example_input is needed for a model not built by bise.models.build_model")
        return tuple(spec["input_shape"])

    def evaluate(self, split_or_data, *, batch_size: int = 256, device="cpu") -> dict:
        """METRICS of the pruned model on a split, or {"test": ..., "val": ...} for a whole dataset."""
        from .evaluate import evaluate

        set_gate_mode(self.gates, "pruned")
        return evaluate(self.model, split_or_data, batch_size=batch_size, device=device)

    def export(self, example_input: Optional[Tensor] = None, **kwargs) -> nn.Module:
        """A plain, physically smaller module (bise.export.export_subnetwork)."""
        from .export import export_subnetwork

        if example_input is None:
            example_input = torch.rand(8, *self._input_shape(), generator=torch.Generator().manual_seed(0))
        set_gate_mode(self.gates, "pruned")
        return export_subnetwork(self.model, self.gates, example_input=example_input, **kwargs)

    def finetune(self, data, epochs: int, *, example_input: Optional[Tensor] = None,
                 exported: Optional[nn.Module] = None, **kwargs) -> nn.Module:
        """BISE+FT: fine-tune the exported subnetwork with the extraction's reweighting (bise.finetune);
        ``exported``: this subnetwork's export to fine-tune (default: ``self.export(example_input)``)."""
        from .finetune import finetune

        kwargs.setdefault("scheme", self.info.get("weighting"))
        kwargs.setdefault("rho", self.info.get("rho"))
        kwargs.setdefault("batch_size", self.info.get("batch_size"))  # the mask-learning batch size
        if self.pseudo_bias is not None:
            if self.info.get("mask_set") == "fresh-draw" and "vanilla_train" not in self.pseudo_bias:
                raise ValueError("this Subnetwork's pseudo bias labels are of the mask set (a second draw), not of "
                                 "the training split fine-tuning uses (saved by an earlier version of bise): extract "
                                 "again, or pass bias= (one label per training sample)")
            kwargs.setdefault("bias", self.pseudo_bias.get("vanilla_train", self.pseudo_bias["train"]))
            kwargs.setdefault("num_bias_classes", data.num_classes)  # pseudo bias labels are predicted classes
        return finetune(self.export(example_input) if exported is None else exported, data, epochs=epochs, **kwargs)

    def save(self, path) -> None:
        """Write everything needed by :meth:`load` to ``path`` (atomic; under torchrun a collective: every
        rank calls it with the same path, rank 0 writes)."""
        config = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else dict(self.config)
        spec = getattr(self.model, "bise_spec", None)
        save_atomic({"format": FORMAT, "model_spec": spec, "state_dict": self.model.state_dict(),
                     "gate_names": list(self.gates), "masks": self.masks, "scores": self.scores,
                     "history": self.history, "config": config, "info": self.info,
                     "pseudo_bias": self.pseudo_bias}, path)

    @classmethod
    def load(cls, path, model: Optional[nn.Module] = None, *, example_input: Optional[Tensor] = None) -> "Subnetwork":
        """Read a saved Subnetwork; ``model`` (same architecture) is needed unless it was a built-in, and
        for a custom model without gates ``example_input`` (a batch of inputs) to insert the saved ones.
        A copy of ``model`` is loaded: the caller's stays as it was (as :func:`bise.extract` leaves it)."""
        import copy

        from .models import rebuild

        state = load_checkpoint(path, required=("format", "state_dict", "gate_names", "masks", "scores"))
        if state["format"] != FORMAT:
            raise ValueError(f"{path} is not a saved Subnetwork (format {state['format']!r})")
        if model is None:
            if state.get("model_spec") is None:
                raise ValueError(f"{path} holds a custom model: pass model= (same architecture) to load it")
            model = rebuild(state["model_spec"])
        else:
            model = copy.deepcopy(model)
        if not gates_of(model):
            if getattr(model, "bise_spec", None) is None and example_input is None:
                raise ValueError(f"{path} holds a custom model; its gates are {list(state['gate_names'])}: pass "
                                 "example_input= (a batch of inputs) to insert them, or a model that has them")
            insert_gates(model, list(state["gate_names"]), example_input=example_input)
        gates = gates_of(model)
        if list(gates) != state["gate_names"]:
            raise ValueError(f"{path}: the model's gates {list(gates)[:3]}... differ from the saved ones "
                             f"{state['gate_names'][:3]}...")
        try:
            model.load_state_dict(state["state_dict"], strict=True)
        except RuntimeError as exc:  # torch's message lists every key; say which argument is wrong first
            raise ValueError(f"{path}: model= is not the architecture it was saved from ({exc})") from None
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        set_gate_mode(gates, "pruned")
        return cls(model, gates, state["masks"], scores=state["scores"], history=state.get("history", []),
                   config=state.get("config", {}), info=state.get("info", {}), pseudo_bias=state.get("pseudo_bias"))


__all__ = ["Subnetwork"]
