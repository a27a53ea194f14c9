"""``torch.optim.SGD.step()`` without the ``Optimizer.step`` wrapper, for the small steps of an extraction.

An extraction takes thousands of SGD steps on a few small tensors (gate scores, linear heads);
there the wrapper (profiler records, hooks, grad-mode switching, ``_init_group``) costs more
than the update. :func:`sgd_step` makes the ATen calls of torch's single-tensor SGD
(``torch/optim/sgd.py``, ``_single_tensor_sgd``) on the optimizer's own momentum buffers, so
parameters and ``optimizer.state`` are bit for bit those of ``optimizer.step()`` (checked in
tests/bise/test_gated_chain.py). Settings it does not reproduce (nesterov, maximize, foreach,
fused, tensor lr, parameters off the CPU, where torch picks its foreach path) go to
``optimizer.step()``.
"""

from __future__ import annotations

import torch


def _plain(optimizer: torch.optim.SGD) -> bool:
    return all(not g["nesterov"] and not g["maximize"] and not g["foreach"] and not g.get("fused")
               and not g["differentiable"] and not isinstance(g["lr"], torch.Tensor)
               and all(p.device.type == "cpu" for p in g["params"]) for g in optimizer.param_groups)


@torch.no_grad()
def sgd_step(optimizer: torch.optim.SGD) -> None:
    """One ``optimizer.step()``: ``g = grad + wd p; buf = momentum buf + (1 - dampening) g; p -= lr buf``."""
    if type(optimizer) is not torch.optim.SGD or not _plain(optimizer):
        optimizer.step()
        return
    for group in optimizer.param_groups:
        weight_decay, momentum, lr, dampening = (group[k] for k in ("weight_decay", "momentum", "lr", "dampening"))
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if weight_decay != 0:
                grad = grad.add(p, alpha=weight_decay)
            if momentum != 0:
                state = optimizer.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = grad.detach().clone()
                    state["momentum_buffer"] = buf
                else:
                    buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                grad = buf
            p.add_(grad, alpha=-lr)


__all__ = ["sgd_step"]
