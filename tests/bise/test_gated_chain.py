"""The cached mask step without autograd (bise/gated_chain.py) and the wrapper-free SGD step (bise/sgd.py):
bit for bit what autograd and torch.optim.SGD compute."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bise.extract import ExtractConfig, prepare_run
from bise.finetune import finetune
from bise.gated_chain import GatedChain
from bise.gates import insert_gates, set_gate_mode
from bise.mask_loss import objective_and_grad
from bise.models import build_model
from bise.sgd import sgd_step


def _mask_epochs(data, arch, width, use_chain, settings, epochs=2):
    torch.manual_seed(0)
    model = build_model(arch, data.num_classes, data.input_shape, width=width).eval()
    run = prepare_run(model, data, ExtractConfig(mask_epochs=4, head_epochs=1, batch_size=64, **settings))
    with run.prefix:
        run.head_phase("head pre-training")
        if not use_chain:
            run.chain = None  # the autograd step
        totals = [run.mask_epoch() for _ in range(epochs)]
    state = {"scores": run.current_scores(), "heads": run.heads.state_dict(),
             "mask_opt": run.mask_opt.state_dict()["state"], "head_opt": run.head_opt.state_dict()["state"]}
    return run.chain, totals, state


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("arch, width, settings", [("mlp", 0.3, {}), ("simple-cnn", 0.25, {}),
                                                   ("mlp", 0.3, dict(mi=False, alpha=0.5))])  # autograd objective
def test_chain_mask_epochs_equal_the_autograd_ones(digits, arch, width, settings):
    data = dataclasses.replace(digits, train=digits.train.subset(torch.arange(300)))
    chain, totals, state = _mask_epochs(data, arch, width, True, settings)
    assert isinstance(chain, GatedChain)
    plain_chain, plain_totals, plain_state = _mask_epochs(data, arch, width, False, settings)
    assert plain_chain is None
    assert totals == plain_totals
    assert _equal(state, plain_state)
    assert any((s < 0).any() for s in state["scores"].values())  # some gate closed: the masks were exercised


def test_objective_and_grad_is_autograds(digits):
    """Random features and batches, including one without bias-conflicting samples (I = 0) and the clamps."""
    torch.manual_seed(0)
    model = build_model("mlp", digits.num_classes, digits.input_shape, width=0.3).eval()
    run = prepare_run(model, digits, ExtractConfig(mask_epochs=4, head_epochs=1, alpha=0.7, gamma=1.3))
    y, b, b2, table = run.labels_on_device()
    g = torch.Generator().manual_seed(1)
    aligned = torch.nonzero(y == b).flatten()[:20]
    for idx in [torch.randperm(len(y), generator=g)[:n] for n in (1, 7, 64, 256)] + [aligned]:
        for scale in (0.1, 1.0, 30.0):
            z = scale * torch.randn(len(idx), run.heads[0].in_features, generator=g)
            leaf = z.clone().requires_grad_()
            expected = run.mask_objective(F.linear(leaf, model.classifier.weight, model.classifier.bias), leaf, idx,
                                          len(idx))
            grad, = torch.autograd.grad(expected[0], leaf)
            got = objective_and_grad(z, model.classifier, run.heads[0], y[idx], b[idx], b2[idx], table,
                                     run.num_bias_classes, 0.7, 1.3)
            assert all(torch.equal(a, e) for a, e in zip(got, (*expected, grad))), (len(idx), scale)
    assert float(expected[2].detach()) == 0.0  # the aligned batch: no conflicting sample


def test_models_that_are_not_chains_use_autograd():
    class Skip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.act1, self.act2 = torch.nn.ReLU(), torch.nn.ReLU()
            self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            a = self.act1(self.conv(x))
            return self.fc((self.act2(self.conv2(a)) + a).mean((2, 3)))  # a residual sum

    from bise.feature_cache import FrozenPrefix

    model = Skip().eval()
    x = torch.rand(6, 3, 5, 5)
    insert_gates(model, example_input=x)
    set_gate_mode({n: m.gate for n, m in model.named_modules() if hasattr(m, "gate")}, "masked")
    prefix = FrozenPrefix.build(model, x, 6, 2**30)
    with torch.no_grad():
        cached = prefix.compute(lambda idx: x[idx], 6, 6)
    with prefix:
        assert GatedChain.build(model, prefix, model.fc, cached) is None


def _chain_model():
    from bise.feature_cache import FrozenPrefix

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.rand(6, 3, 2, 2)
    gates = insert_gates(model, ["2", "4"], example_input=x)
    prefix = FrozenPrefix.build(model, x, 6, 2**30)
    with torch.no_grad():
        cached = prefix.compute(lambda idx: x[idx], 6, 6)
    return model, gates, prefix, cached


def test_a_chain_is_built_only_where_it_matches_autograd(monkeypatch):
    """build() checks the chain against autograd's score gradients: gates that are off or frozen have none to
    match, and a chain whose gradients differ is refused (taken unchecked, the mask step would follow other
    gradients); the check leaves the scores' gradients as they were."""
    import bise.gated_chain as gc

    model, gates, prefix, cached = _chain_model()
    with prefix:
        for mode in ("vanilla", "pruned"):
            set_gate_mode(gates, mode)
            assert GatedChain.build(model, prefix, model[5], cached) is None, mode
        set_gate_mode(gates, "masked")
        before = {n: torch.full_like(g.scores, 7.0) for n, g in gates.items()}
        for n, g in gates.items():
            g.scores.grad = before[n].clone()
        assert isinstance(GatedChain.build(model, prefix, model[5], cached), GatedChain)
        assert all(torch.equal(g.scores.grad, before[n]) for n, g in gates.items())
        monkeypatch.setattr(gc._Linear, "backward", lambda self, g, x: 2 * g.mm(self.module.weight))
        assert GatedChain.build(model, prefix, model[5], cached) is None


def test_a_prefix_cache_over_the_memory_limit_is_not_built():
    from bise.feature_cache import BottleneckTap, FrozenPrefix

    model, _, _, _ = _chain_model()
    x = torch.rand(6, 3, 2, 2)
    # the prefix (Flatten, Linear(12, 8)) ends in 8 float32 features a sample: 100 samples take 3,200 bytes
    assert FrozenPrefix.build(model, x, 100, 3200) is not None
    with pytest.warns(UserWarning, match="frozen-prefix cache would take"):
        assert FrozenPrefix.build(model, x, 100, 3199) is None
    tap = BottleneckTap(model[5])
    with torch.no_grad():
        model(x)
    assert tap.take().shape == (6, 8)
    with pytest.raises(RuntimeError, match="did not run"):  # taken once: never handed out again as current
        tap.take()
    tap.close()


@pytest.mark.parametrize("settings", [dict(momentum=0.9, weight_decay=1e-4), dict(momentum=0.5, dampening=0.3),
                                      dict(), dict(momentum=0.9, nesterov=True)])
def test_sgd_step_is_the_optimizer_step(settings):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7,), (3, 5))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, twin_opt = (torch.optim.SGD(ps, lr=0.1, **settings) for ps in (params, twins))
    for step in range(4):
        for p, q in zip(params, twins):
            grad = None if step == 1 and p.dim() == 1 else torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad, None if grad is None else grad.clone()
        sgd_step(opt)
        twin_opt.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twins))
    assert _equal(opt.state_dict(), twin_opt.state_dict())


def test_sgd_step_leaves_parameters_off_the_cpu_to_the_optimizer(monkeypatch):
    """Off the CPU torch takes its foreach path, whose rounding sgd_step does not reproduce: a parameter on
    another device (meta here, standing in for a GPU) hands the whole step to ``optimizer.step()``."""
    stepped = []
    for device, delegated in (("cpu", False), ("meta", True)):
        p = torch.nn.Parameter(torch.ones(3, device=device))
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        monkeypatch.setattr(opt, "step", lambda: stepped.append(device))
        p.grad = torch.ones(3, device=device)
        sgd_step(opt)
        assert (stepped[-1:] == [device]) is delegated


def test_finetune_puts_each_split_on_the_device_once(digits, monkeypatch):
    from bise.batching import DeviceSplit

    made = []
    real_init = DeviceSplit.__init__

    def counting_init(self, split, *args, **kwargs):
        made.append(split)
        real_init(self, split, *args, **kwargs)

    monkeypatch.setattr(DeviceSplit, "__init__", counting_init)
    data = dataclasses.replace(digits, train=digits.train.subset(torch.arange(200)))
    torch.manual_seed(0)
    model = build_model("mlp", data.num_classes, data.input_shape, width=0.2)
    history = []
    finetune(model, data, epochs=3, history=history, quiet=True, arch="mlp")
    assert len(history) == 3
    assert len(made) == 2 and made[0] is data.train and made[1] is data.val


def test_objective_and_grad_indexes_the_weight_table_by_target_then_bias(digits):
    """group-balanced and empirical-joint tables are not symmetric (the symmetric-rho table of
    colored-digits is): objective_and_grad weighs sample i by table[y_i, b_i] as mask_objective does."""
    torch.manual_seed(0)
    model = build_model("mlp", digits.num_classes, digits.input_shape, width=0.3).eval()
    run = prepare_run(model, digits, ExtractConfig(mask_epochs=4, head_epochs=1, alpha=0.7, gamma=1.3))
    y, b, b2, table = run.labels_on_device()
    asymmetric = torch.rand(table.shape, generator=torch.Generator().manual_seed(2)) + 0.5
    assert not torch.equal(asymmetric, asymmetric.t())
    run.labels_on_device = lambda: (y, b, b2, asymmetric)
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))[:64]
    z = torch.randn(len(idx), run.heads[0].in_features, generator=torch.Generator().manual_seed(3))
    leaf = z.clone().requires_grad_()
    expected = run.mask_objective(F.linear(leaf, model.classifier.weight, model.classifier.bias), leaf, idx, len(idx))
    grad, = torch.autograd.grad(expected[0], leaf)
    got = objective_and_grad(z, model.classifier, run.heads[0], y[idx], b[idx], b2[idx], asymmetric,
                             run.num_bias_classes, 0.7, 1.3)
    assert all(torch.equal(a, e) for a, e in zip(got, (*expected, grad)))


@pytest.mark.parametrize("settings", [dict(momentum=0.9), dict(momentum=0.9, weight_decay=1e-4)])
def test_sgd_step_momentum_buffer_is_not_the_gradient(settings):
    """Gradients zeroed in place between steps (zero_grad(set_to_none=False), or accumulated into
    p.grad): the first step's momentum buffer is a copy, as torch's, not p.grad itself."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, generator=g))
    q = torch.nn.Parameter(p.detach().clone())
    opt, twin_opt = torch.optim.SGD([p], lr=0.1, **settings), torch.optim.SGD([q], lr=0.1, **settings)
    for _ in range(3):
        opt.zero_grad(set_to_none=False)
        twin_opt.zero_grad(set_to_none=False)
        grad = torch.randn(5, generator=g)
        if p.grad is None:
            p.grad, q.grad = grad.clone(), grad.clone()
        else:
            p.grad.add_(grad)
            q.grad.add_(grad)
        sgd_step(opt)
        twin_opt.step()
        assert torch.equal(p, q)


def test_sgd_step_of_another_optimizer_is_its_own_step():
    """sgd_step hands an optimizer that is not a plain torch.optim.SGD (Adam, a subclass) to its step()."""
    class ClippedSGD(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                torch.nn.utils.clip_grad_norm_(group["params"], 0.01)
            return super().step(closure)

    for make in (lambda ps: torch.optim.Adam(ps, lr=0.1), lambda ps: ClippedSGD(ps, lr=0.1, momentum=0.9)):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5, generator=g))
        q = torch.nn.Parameter(p.detach().clone())
        opt, twin_opt = make([p]), make([q])
        for _ in range(2):
            grad = torch.randn(5, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
            sgd_step(opt)
            twin_opt.step()
            assert torch.equal(p, q)
