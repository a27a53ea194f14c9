"""The two BISE losses, public so they can go into any training loop (docs/method.md sections 4-5).

* :func:`reweighted_cross_entropy`: ``L_r = mean_j r_j * CE(logits_j, y_j)`` (a plain batch mean,
  not divided by sum r) with the per-sample weight ``r_j`` looked up in a :func:`weight_table`.
* :func:`mutual_information`: the batch estimator of I(b_hat; b) on the auxiliary bias head's
  logits, normalised by log K, over a subset of the batch (BISE: the bias-conflicting samples).

Weighting schemes (C classes; a sample is bias-aligned iff y == b):

======================  ==========================================================================
"symmetric-rho"         aligned 1/(C rho), conflicting (C-1)/(C (1-rho)); rho = nominal correlation
"group-balanced"        1/(G p(y, b)), p from training counts, G = number of (y, b) groups present
                        (the paper's 1/(4 p) for binary y and b)
"two-bias"              b is (N, 2); by (left, right) pattern: aligned/aligned 1/(rL rR),
                        aligned/conflicting 1/(rL (1-rR)), conflicting/aligned 1/((1-rL) rR),
                        conflicting/conflicting 1/((1-rL)(1-rR)); unnormalised; rho = (rL, rR)
"empirical-joint"       1/(C^2 q(y, b)), q = (y, b) counts clamped at >= 1, normalised (label-free)
======================  ==========================================================================
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

SCHEMES = ("symmetric-rho", "group-balanced", "two-bias", "empirical-joint")
COUNT_SCHEMES = ("group-balanced", "empirical-joint")
CLAMP = 1e-15


def _check_rho(rho, name="rho") -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0.0 < float(rho) < 1.0:
        raise ValueError(f"{name} must be a float in (0, 1), got {rho!r}")
    return float(rho)


def _counts(targets: Tensor, bias: Tensor, num_classes: int, num_bias_classes: int) -> Tensor:
    if bias.dim() != 1 or targets.shape != bias.shape:
        raise ValueError(f"targets and bias must be 1-d of equal length, got {tuple(targets.shape)} and "
                         f"{tuple(bias.shape)}")
    flat = targets.long() * num_bias_classes + bias.long()
    return torch.bincount(flat, minlength=num_classes * num_bias_classes).reshape(num_classes, num_bias_classes)


def weight_table(scheme: str, *, num_classes: Optional[int] = None, rho: Union[float, Sequence[float], None] = None,
                 targets: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                 num_bias_classes: Optional[int] = None) -> Tensor:
    """The per-sample weights of ``scheme`` as a table (float32).

    Returns a (C, K) table indexed ``[y, b]`` for "symmetric-rho" (needs ``num_classes``, ``rho``),
    "group-balanced" and "empirical-joint" (need the TRAINING split's ``targets`` and ``bias``), and a
    (2, 2) table indexed ``[left conflicting, right conflicting]`` for "two-bias" (needs
    ``rho=(rL, rR)``: Multi-Color MNIST's is (0.99, 0.95); no default, which weighted other data with it).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "two-bias":
        if not isinstance(rho, (tuple, list)) or len(rho) != 2:
            raise ValueError(f"two-bias weighting needs rho=(rho_left, rho_right), got {rho!r}")
        rl, rr = rho
        rl, rr = _check_rho(rl, "rho[0] (left)"), _check_rho(rr, "rho[1] (right)")
        left = torch.tensor([rl, 1 - rl], dtype=torch.float64)
        right = torch.tensor([rr, 1 - rr], dtype=torch.float64)
        return (1.0 / (left[:, None] * right[None, :])).float()
    if scheme == "symmetric-rho":
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"symmetric-rho needs num_classes >= 2, got {num_classes!r}")
        rho = _check_rho(rho)
        c = num_classes
        table = torch.full((c, c), (c - 1) / (c * (1 - rho)), dtype=torch.float64)
        table.fill_diagonal_(1 / (c * rho))
        return table.float()
    if targets is None or bias is None:
        raise ValueError(f"{scheme} weights come from the training split's counts: pass targets= and bias=")
    c = int(num_classes if num_classes is not None else int(targets.max()) + 1)
    k = int(num_bias_classes if num_bias_classes is not None else c)
    counts = _counts(targets.cpu(), bias.cpu(), c, k).double()
    if scheme == "empirical-joint":
        q = counts.clamp(min=1)
        q = q / q.sum()
        return (1.0 / (c * c * q)).float()
    present = counts > 0
    p = counts / counts.sum()
    table = torch.where(present, 1.0 / (present.sum() * p.clamp(min=1e-300)), torch.zeros_like(p))
    return table.float()


def sample_weights(targets: Tensor, bias: Tensor, table: Tensor) -> Tensor:
    """r_j for each sample: ``table[y, b]`` or, for (N, 2) bias, ``table[y != b_left, y != b_right]``."""
    table = table.to(device=targets.device)
    if bias.dim() == 2:
        if table.shape != (2, 2):
            raise ValueError(f"two-bias labels (N, 2) need a (2, 2) pattern table, got {tuple(table.shape)}")
        return table[(targets != bias[:, 0]).long(), (targets != bias[:, 1]).long()]
    if bias.dim() != 1:
        raise ValueError(f"bias must be (N,) or (N, 2), got shape {tuple(bias.shape)}")
    return table[targets.long(), bias.long()]


def reweighted_cross_entropy(logits: Tensor, targets: Tensor, bias: Tensor, *, scheme: Optional[str] = None,
                             rho: Union[float, Sequence[float], None] = None, num_classes: Optional[int] = None,
                             group_weights: Optional[Tensor] = None) -> Tensor:
    """``L_r = (1/N) sum_j r_j CE(logits_j, targets_j)``; r from ``group_weights`` or ``scheme``.

    ``group_weights``: a table from :func:`weight_table` (required for "group-balanced" and
    "empirical-joint", whose weights must come from the whole training split, not a batch).
    Otherwise ``scheme`` with ``rho`` (and ``num_classes``, default ``logits.shape[1]``).
    """
    if logits.dim() != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(f"logits must be (N, C) and targets (N,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if bias is None or bias.shape[0] != logits.shape[0]:
        raise ValueError(f"bias labels must have one row per sample ({logits.shape[0]}), got "
                         f"{None if bias is None else tuple(bias.shape)}")
    if group_weights is None:
        if scheme in COUNT_SCHEMES:
            raise ValueError(f"scheme {scheme!r} needs group_weights=weight_table({scheme!r}, targets=y_train, "
                             "bias=b_train) computed on the training split")
        group_weights = weight_table(scheme, num_classes=num_classes or logits.shape[1], rho=rho)
    r = sample_weights(targets, bias, group_weights).to(logits.dtype)
    return (r * F.cross_entropy(logits, targets, reduction="none")).mean()


def mutual_information(aux_logits: Tensor, bias: Tensor, num_bias_classes: int,
                       sample_mask: Optional[Tensor] = None) -> Tensor:
    """BISE's batch estimate of I(b_hat; b) / log K over the samples where ``sample_mask`` is True.

    With S the selected samples, n = |S|, e_j = one-hot(b_j), p_j = softmax(aux_logits_j):
    ``J_kl = max(sum_{j in S} e_jk p_jl, 1e-15) / n``; a, c = row and column sums of that clamped J;
    ``I = sum_kl J_kl log(J_kl / max(a_k c_l, 1e-15)) / log K``. An empty S gives 0 with a zero
    gradient. With ``sample_mask`` the unselected rows are zeroed, not removed, so the estimate needs
    no host synchronisation (the sums may differ from the row-removed ones in the last bits). With a single sample (or one bias class in S) I is 0 up to ~1e-14.
    """
    k = num_bias_classes
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"num_bias_classes must be an int >= 2 (log K normalises), got {k!r}")
    if aux_logits.dim() != 2 or aux_logits.shape[1] != k:
        raise ValueError(f"aux_logits must be (N, num_bias_classes={k}), got {tuple(aux_logits.shape)}")
    if bias.shape != (aux_logits.shape[0],):
        raise ValueError(f"bias must be (N,) = ({aux_logits.shape[0]},), got {tuple(bias.shape)}")
    if sample_mask is not None:
        if sample_mask.shape != bias.shape or sample_mask.dtype != torch.bool:
            raise ValueError(f"sample_mask must be bool of shape {tuple(bias.shape)}, got {sample_mask.dtype} "
                             f"{tuple(sample_mask.shape)}")
        # the unselected rows of e are zero: no data-dependent shape, so no host synchronisation
        e = F.one_hot(bias.long(), k).to(aux_logits.dtype) * sample_mask[:, None].to(aux_logits.dtype)
        n = sample_mask.sum()
        mi = _normalised_mi(e, aux_logits.softmax(dim=1), n.clamp(min=1), k)
        return torch.where(n > 0, mi, torch.zeros_like(mi))
    if aux_logits.shape[0] == 0:
        return aux_logits.new_zeros(()).detach()
    e = F.one_hot(bias.long(), k).to(aux_logits.dtype)
    return _normalised_mi(e, aux_logits.softmax(dim=1), aux_logits.shape[0], k)


def _normalised_mi(e: Tensor, p: Tensor, n, k: int) -> Tensor:
    joint = (e.t() @ p).clamp(min=CLAMP) / n
    a = joint.sum(dim=1, keepdim=True)
    c = joint.sum(dim=0, keepdim=True)
    return (joint * torch.log(joint / (a * c).clamp(min=CLAMP))).sum() / math.log(k)


__all__ = ["SCHEMES", "mutual_information", "reweighted_cross_entropy", "sample_weights", "weight_table"]
