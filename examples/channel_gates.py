"""Channel gates in your own model: the threshold rule (learnt width) vs the density rule (fixed width).

``bk.ChannelGate(C)`` multiplies a (N, C, ...) activation by a 0/1 gate per channel computed from a
learnable score: with ``threshold`` (default 0.0, the BISE gate) channel c is on iff score_c >= 0, so
training decides how many channels stay; with ``density`` the top ``max(1, round(density * C))`` scores are
on, exactly, at every step. Gradients reach the scores through a straight-through estimator
(``estimator="sigmoid"``: the slope of sigmoid(score / temperature)).

A small CNN with a gate after each ReLU trains from the same initialisation three times, weights
and gate scores together, the scores starting at 1.0 (every channel open): gates disabled
(``gate.enabled = False``: the identity, the plain CNN); threshold gates with a price on open
channels (``cost`` * the sum of the scores, a constant push down that only useful channels resist);
density gates without one. It prints the open channels per layer as training goes and checks, on
the trained scores, each rule's mask and that each gate outputs ``x * mask``.

    python examples/channel_gates.py                          # density 0.5, cost 0.005, 15 epochs
    python examples/channel_gates.py --density 0.25 --cost 0.002 --device cuda
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import bise
import bise_kernels as bk


class GatedCNN(nn.Module):
    def __init__(self, classes: int, gate: dict, widths=(32, 64)):
        super().__init__()
        self.conv1, self.gate1 = nn.Conv2d(3, widths[0], 3, padding=1), bk.ChannelGate(widths[0], **gate)
        self.conv2, self.gate2 = nn.Conv2d(widths[0], widths[1], 3, padding=1), bk.ChannelGate(widths[1], **gate)
        self.fc = nn.Linear(widths[1], classes)

    def forward(self, x):
        x = self.gate1(F.relu(self.conv1(x)))
        x = self.gate2(F.relu(self.conv2(F.max_pool2d(x, 2))))
        return self.fc(x.mean((2, 3)))

    def gates(self) -> list:
        return [self.gate1, self.gate2]


def train(net, x, y, *, epochs: int, lr: float, score_lr: float, cost: float, seed: int, log):
    """Weights and gate scores together (Adam); ``cost`` * the sum of the scores prices open channels."""
    scores = [g.scores for g in net.gates()]
    weights = [p for n, p in net.named_parameters() if not n.endswith("scores")]
    opt = torch.optim.Adam([{"params": weights}, {"params": scores, "lr": score_lr}], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            idx = idx.to(x.device)
            loss = F.cross_entropy(net(x[idx]), y[idx]) + cost * sum(s.sum() for s in scores)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch % 3 == 0 or epoch == epochs:
            log(epoch)


@torch.no_grad()
def accuracy(net, x, y) -> float:
    return (net(x).argmax(1) == y).float().mean().item()


def expected_mask(scores, density) -> torch.Tensor:
    """score >= 0 (threshold 0.0), or the top max(1, round(density * C)) scores, ties to the lower channel."""
    if density is None:
        return scores >= 0
    top = scores.argsort(descending=True, stable=True)[:max(1, round(density * len(scores)))]
    return torch.zeros_like(scores, dtype=torch.bool).index_fill_(0, top, True)


def open_channels(net) -> list:
    return [int(g.mask().sum()) for g in net.gates()]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--density", type=float, default=0.5, help="the density rule's fraction of open channels")
    # cost 0.005: open channels [24, 25] of [32, 64] after 15 epochs; 0.001: [32, 52]; 0.02: all closed
    p.add_argument("--cost", type=float, default=0.005, help="the threshold rule's price of open-channel score")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--score-lr", type=float, default=0.01)  # 0.05 closed every gate within 3 epochs
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()

    data = bise.load_data("colored-digits:rho=0.1", seed=a.seed)  # colour independent of the digit
    x, y = data.train.inputs().to(a.device), data.train.y.to(a.device)
    xt, yt = data.test.inputs().to(a.device), data.test.y.to(a.device)
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True)
    x, xt = (x - mean) / std, (xt - mean) / std

    rules = (("plain CNN", None, 0.0), ("threshold 0.0", {"threshold": 0.0}, a.cost),
             (f"density {a.density}", {"density": a.density}, 0.0))
    for name, gate, cost in rules:
        torch.manual_seed(a.seed)  # the same initial weights for every rule
        net = GatedCNN(data.num_classes, {**(gate or {}), "init": 1.0}).to(a.device)  # scores 1.0: all open
        for g in net.gates():
            g.enabled = gate is not None  # a disabled gate is the identity

        widths = [g.num_channels for g in net.gates()]

        def log(epoch, net=net, name=name, gated=gate is not None, widths=widths):
            print(f"  {name:<14} epoch {epoch:>2}: open channels {open_channels(net) if gated else widths} of "
                  f"{widths}, test accuracy {accuracy(net, xt, yt):.3f}")

        print(f"{name}" + (f", cost {cost} per unit of open-channel score" if cost else ""))
        train(net, x, y, epochs=a.epochs, lr=3e-3, score_lr=a.score_lr, cost=cost, seed=a.seed, log=log)
        if gate is None:
            continue
        for g in net.gates():  # what each rule means, checked on the trained scores
            expected = expected_mask(g.scores.detach(), gate.get("density"))
            assert torch.equal(g.mask(), expected), name
            h = torch.randn(4, g.num_channels, 5, 5, device=a.device)
            assert torch.equal(g(h), h * expected.to(h.dtype).view(1, -1, 1, 1))
    print("checked: threshold gates open iff score >= 0; density gates open exactly the top "
          "max(1, round(density * C)); each gate outputs x * mask")


if __name__ == "__main__":
    main()
