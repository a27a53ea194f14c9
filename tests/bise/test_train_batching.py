"""Device-resident batches (bise/batching.py) and the autograd-free head steps (bise/heads.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bise import distributed
from bise.batching import DeviceSplit
from bise.data.types import Split
from bise.heads import set_head_grads
from bise.models import build_model
from bise.recipes import RECIPES
from bise.train import fit


def _split(n=130, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return Split(torch.randint(0, 256, (n, 3, 5, 5), generator=g, dtype=torch.uint8), y, (y + 1) % 3)


@pytest.mark.parametrize("limit", [None, 0], ids=["resident", "dataloader"])
def test_batches_are_the_loader_batches_for_a_seed(limit):
    """Same order and content as distributed.local_batches + Split.inputs, bit for bit, on both paths."""
    split = _split()
    data = DeviceSplit(split, "cpu", resident_limit_bytes=limit)
    assert data.resident == (limit is None)
    assert torch.equal(data.y, split.y) and torch.equal(data.b, split.b.long())  # the labels the loops look up
    expected = list(distributed.local_batches(len(split), 32, torch.Generator().manual_seed(7), distributed.Context()))
    got = list(data.batches(32, torch.Generator().manual_seed(7)))
    assert len(got) == len(expected) == 5
    for (x, idx, n_global), (ref_idx, ref_n) in zip(got, expected):
        assert torch.equal(idx, ref_idx) and n_global == ref_n
        assert x.dtype == torch.float32 and torch.equal(x, split.inputs(ref_idx))
        assert torch.equal(data.y[idx], split.y[ref_idx])
    ordered = [idx for _, idx, _ in data.batches(50)]
    assert torch.equal(torch.cat(ordered), torch.arange(len(split))) and [len(i) for i in ordered] == [50, 50, 30]
    assert torch.equal(data.inputs(torch.tensor([4, 0, 4])), split.inputs(torch.tensor([4, 0, 4])))


def test_shares_of_a_multi_process_run_cover_each_global_batch():
    split = _split(n=23)
    data = DeviceSplit(split, "cpu")
    shares = [list(data.indices(10, torch.Generator().manual_seed(1), distributed.Context(rank=r, world_size=2)))
              for r in range(2)]
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    for k, ((a, n_a), (b, n_b)) in enumerate(zip(*shares)):
        assert n_a == n_b == len(order[10 * k:10 * k + 10])
        assert torch.equal(torch.cat([a, b]), order[10 * k:10 * k + 10])


def test_other_split_objects_use_their_inputs():
    class Floats:
        def __init__(self):
            self.x, self.y = torch.rand(9, 2), torch.arange(9) % 2

        def __len__(self):
            return 9

        def inputs(self, index=None):
            return self.x if index is None else self.x[index]

    s = Floats()
    data = DeviceSplit(s, "cpu")
    assert data.b is None and torch.equal(data.inputs(torch.tensor([3, 1])), s.x[[3, 1]])
    # the budget is in bytes: 18 float32 inputs take 72 bytes, not 18
    assert DeviceSplit(s, "cpu", resident_limit_bytes=72).resident
    assert not DeviceSplit(s, "cpu", resident_limit_bytes=71).resident
    assert DeviceSplit(_split(n=4), "cpu", resident_limit_bytes=300).resident  # 4 x 75 uint8 bytes
    assert not DeviceSplit(_split(n=4), "cpu", resident_limit_bytes=299).resident


@pytest.mark.parametrize("total, limit", [(8 * 2**30, 2 * 2**30), (80 * 2**30, 2 * 2**30), (4 * 2**30, 2**30)])
def test_the_resident_budget_is_the_smaller_of_2_gib_and_a_quarter_of_the_gpu(monkeypatch, total, limit):
    """A split over a quarter of a small GPU's memory must stay on the host (a larger budget ran out of memory)."""
    from bise import batching

    class Props:
        total_memory = total

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props())
    assert batching.resident_limit(torch.device("cuda", 0)) == limit
    assert batching.resident_limit(torch.device("cpu")) == float("inf")


def _host_fed(model, split, opt, sched, epochs, batch_size=20, seed=3):
    """The plain training loop fit must equal: batches of Split.inputs in a seeded order, the scheduler per epoch."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(split), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(split.inputs(idx)), split.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()


def test_fit_equals_the_host_fed_loop():
    """fit on device-resident batches = the plain loop over Split.inputs (same seed), bit for bit."""
    split = _split(n=90)
    recipe = dict(RECIPES["simple-cnn"], milestones=[1])
    torch.manual_seed(0)
    model = build_model("simple-cnn", 3, (3, 5, 5), width=0.25)
    reference = copy.deepcopy(model).train()
    fit(model, split, recipe, epochs=2, batch_size=20, lr=0.05, seed=3, quiet=True)
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1], 0.1)
    _host_fed(reference, split, opt, sched, epochs=2)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("heads,scale", [(1, 1.0), (2, 0.375)])
def test_head_grads_are_the_autograd_grads(heads, scale):
    """set_head_grads and then SGD: the same parameters as autograd + SGD, bit for bit, over 5 steps."""
    torch.manual_seed(0)
    auto = nn.ModuleList(nn.Linear(24, 4) for _ in range(heads))
    fast = copy.deepcopy(auto)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for m in (auto, fast)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        z, t = torch.randn(50, 24, generator=g), torch.randint(0, 4, (50, heads), generator=g)
        loss = sum(F.cross_entropy(h(z), t[:, k]) for k, h in enumerate(auto)) * scale
        opts[0].zero_grad(set_to_none=True)
        loss.backward()
        opts[0].step()
        ce = set_head_grads(fast, z, t, torch.tensor(scale))  # the unscaled sum over the heads (the logged loss)
        torch.testing.assert_close(ce * scale, loss.detach())
        opts[1].step()
    for a, b in zip(auto.parameters(), fast.parameters()):
        assert torch.equal(a, b)


def test_of_makes_a_device_split_on_another_device_only():
    """DeviceSplit.of reuses a split already on the device and puts one on another device anew (meta stands
    in for a GPU): a split handed over for another device must not be used where it is."""
    s = _split(n=4)
    here = DeviceSplit(s, "cpu")
    assert DeviceSplit.of(here, "cpu") is here
    there = DeviceSplit.of(here, "meta")
    assert there.device == torch.device("meta") and there.x.device.type == "meta" and there.split is s
    assert there.y.device.type == "meta"


@pytest.mark.parametrize("name", ["mlp", "resnet18"])
def test_fit_with_an_adam_recipe_equals_the_host_fed_loop(name):
    """The Adam recipes: weight decay 1e-4, and (resnet18) the cosine schedule over the epochs run."""
    split = _split(n=90)
    recipe = RECIPES[name]
    torch.manual_seed(0)
    model = build_model("mlp", 3, (3, 5, 5), width=0.25)
    reference = copy.deepcopy(model).train()
    fit(model, split, recipe, epochs=3, batch_size=20, lr=0.01, seed=3, quiet=True)
    opt = torch.optim.Adam(reference.parameters(), lr=0.01, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3) if recipe["schedule"] == "cosine" else None
    _host_fed(reference, split, opt, sched, epochs=3)
    assert not model.training  # fit hands the model back in eval mode
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_train_epoch_returns_the_mean_loss_per_sample():
    from bise.train import train_epoch

    split = _split(n=90)
    torch.manual_seed(0)
    model = build_model("mlp", 3, (3, 5, 5), width=0.25).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay: every batch's loss is that of one model
    y = split.y.long()
    mean = train_epoch(model, split, opt, torch.Generator().manual_seed(0), 20, "cpu",
                       lambda logits, idx: F.cross_entropy(logits, y[idx]))
    with torch.no_grad():
        expected = float(F.cross_entropy(model(split.inputs()), y))
    assert mean == pytest.approx(expected, rel=1e-5)
