"""The mask step's objective ``alpha L_r + gamma I`` and its gradient w.r.t. the bottleneck features, without autograd.

:meth:`bise.extract._Run.mask_objective` builds the objective from the logits and the bottleneck
features ``z`` (reweighted CE on the classifier, the MI estimate on the auxiliary head, see
bise/losses.py); in the cached mask step autograd then walks about forty tiny nodes per step.
:func:`objective_and_grad` makes the same forward ATen calls and, for the backward, the calls
autograd's nodes make (derivative formulas of torch's derivatives.yaml, gradients accumulated in
the engine's order), so the returned ``dL/dz`` is autograd's bit for bit (checked against
``mask_objective`` in tests/bise/test_gated_chain.py). It covers the defaults: one bias head,
reweighting and MI on, one process; other settings use autograd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_NONE = 0  # at::Reduction::None
_IGNORE = -100
_CLAMP = 1e-15  # bise.losses.CLAMP


@torch.no_grad()
def objective_and_grad(z: Tensor, classifier: nn.Linear, head: nn.Linear, y: Tensor, b: Tensor, b_col: Tensor,
                       table: Tensor, k: int, alpha: float, gamma: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(objective, L_r, I, dobjective/dz)`` for features ``z`` (B, d) of a batch with targets ``y``,
    bias labels ``b`` (B,) and ``b_col`` (B, 1), the weight table and ``k`` bias classes."""
    rows = z.shape[0]
    # L_r = mean(r * CE(classifier(z), y)) (bise.losses.reweighted_cross_entropy), scaled by 1 (one process)
    logits = F.linear(z, classifier.weight, classifier.bias)
    r = table[y, b].to(logits.dtype)
    logp = torch.log_softmax(logits, 1)
    ce, total_weight = torch.ops.aten.nll_loss_forward(logp, y, None, _NONE, _IGNORE)
    lr_ = (r * ce).mean() * 1.0
    # I on the head's logits over the bias-conflicting rows (bise.losses.mutual_information)
    packed = torch.cat([F.linear(z, head.weight, head.bias), y[:, None].to(z.dtype), b_col.to(z.dtype)], dim=1)
    y_all, b_all, aux_logits = packed[:, k].long(), packed[:, k + 1].long(), packed[:, :k]
    conflicting = y_all != b_all
    e = (b_all[:, None] == torch.arange(k, device=z.device)).to(z.dtype) * conflicting[:, None].to(z.dtype)
    n = conflicting.sum()
    p = aux_logits.softmax(dim=1)
    n1 = n.clamp(min=1)
    joint0 = e.t() @ p
    joint = joint0.clamp(min=_CLAMP) / n1
    a, c = joint.sum(dim=1, keepdim=True), joint.sum(dim=0, keepdim=True)
    ac = a * c
    ac_clamped = ac.clamp(min=_CLAMP)
    ratio = joint / ac_clamped
    log_ratio = torch.log(ratio)
    mi0 = (joint * log_ratio).sum() / math.log(k)
    some = n > 0
    mi = logits.new_zeros(()) + torch.where(some, mi0, torch.zeros_like(mi0)) / 1
    objective = alpha * lr_ + gamma * mi

    # backward, node by node in the engine's order
    seed = torch.ones_like(objective)
    g_mi, g_lr = seed * gamma, seed * alpha
    zero = torch.scalar_tensor(0.0, dtype=z.dtype, device=z.device)
    g = (torch.where(some, g_mi / 1, zero) / math.log(k)).expand(k, k)  # Div, Where, Div, Sum
    g_log_ratio = g * joint
    g_joint = g * log_ratio  # Mul
    g_ratio = g_log_ratio / ratio  # Log
    g_ac_clamped = -g_ratio * ((joint / ac_clamped) / ac_clamped)  # Div (other)
    g_joint = g_joint + g_ratio / ac_clamped  # Div (self)
    g_ac = torch.where(ac >= _CLAMP, g_ac_clamped, zero)  # Clamp
    g_c, g_a = (g_ac * a).sum(0, keepdim=True), (g_ac * c).sum(1, keepdim=True)  # Mul, summed to the shapes
    g_joint = g_joint + g_c.expand(k, k)
    g_joint = g_joint + g_a.expand(k, k)
    g_joint0 = torch.where(joint0 >= _CLAMP, g_joint / n1, zero)  # Div, Clamp
    g_p = e.mm(g_joint0)  # Mm (mat2)
    g_aux = torch.ops.aten._softmax_backward_data(g_p, p, 1, p.dtype)
    g_packed = torch.ops.aten.slice_backward(g_aux, list(packed.shape), 1, 0, k, 1)
    g_z_mi = g_packed[:, :k].mm(head.weight)  # Cat, Addmm
    g_lr = g_lr * 1.0
    g_ce = torch.ops.aten.div.Scalar(g_lr.expand(rows), rows) * r  # Mul, Mean, Mul
    g_logp = torch.ops.aten.nll_loss_backward(g_ce, logp, y, None, _NONE, _IGNORE, total_weight)
    g_logits = torch.ops.aten._log_softmax_backward_data(g_logp, logp, 1, logp.dtype)
    return objective, lr_, mi, g_z_mi + g_logits.mm(classifier.weight)


__all__ = ["objective_and_grad"]
