"""Drop-in modules: from_dense / to_dense, mask_model (layerwise and global), compile, frozen weights."""

import copy

import pytest
import torch
from torch import nn

import bise_kernels as bk
from _oracle import sort_mask


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 5),
    )


def test_all_kept_masked_model_equals_dense_model_exactly():
    dense = _net().eval()
    masked = copy.deepcopy(dense)
    bk.mask_model(masked, density=1.0)
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(masked(x), dense(x))


@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_to_dense_bakes_the_mask_and_matches(granularity):
    conv = nn.Conv2d(3, 6, 3)
    layer = bk.MaskedConv2d.from_dense(conv, granularity, density=0.5, score_init="magnitude")
    x = torch.randn(2, 3, 6, 6)
    dense = layer.to_dense()
    assert type(dense) is nn.Conv2d
    torch.testing.assert_close(dense(x), layer(x), rtol=0, atol=0)
    expected = sort_mask(layer.scores.detach(), round(0.5 * layer.scores.numel()))
    assert torch.equal(layer.mask(), expected)
    lin = bk.MaskedLinear.from_dense(nn.Linear(5, 4), granularity, threshold=0.0, score_init=0.0)
    assert torch.equal(lin.to_dense().weight, lin.weight)  # score 0 >= threshold 0: all kept


def test_score_init_rules():
    """"magnitude": |w| per weight, the L2 norm of each output unit's weights per channel; "zeros"; a
    constant; "kaiming": uniform within +-sqrt(3 / fan_in); float32 whatever the weight's dtype."""
    from bise_kernels.nn.masked import init_scores

    w = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert torch.equal(init_scores(w, "weight", "magnitude"), w.abs().float())
    norms = torch.stack([torch.sqrt((w[i].float() ** 2).sum()) for i in range(4)])
    torch.testing.assert_close(init_scores(w, "channel", "magnitude"), norms, rtol=1e-6, atol=0)
    assert torch.equal(init_scores(w, "channel", "zeros"), torch.zeros(4))
    assert torch.equal(init_scores(w, "weight", 0.25), torch.full(w.shape, 0.25))
    torch.manual_seed(0)
    kaiming = init_scores(w, "weight", "kaiming")
    bound = (3 / 12) ** 0.5
    assert kaiming.dtype == torch.float32 and kaiming.shape == w.shape
    assert float(kaiming.abs().max()) <= bound and float(kaiming.abs().max()) > 0.8 * bound
    with pytest.raises(ValueError, match="score_init must be"):
        init_scores(w, "weight", "normal")


def test_from_dense_shares_and_freezes_the_original_parameters():
    linear = nn.Linear(4, 3)
    before = linear.weight.detach().clone()
    layer = bk.MaskedLinear.from_dense(linear, density=0.5)
    assert layer.weight is linear.weight and not layer.weight.requires_grad
    opt = torch.optim.SGD([layer.scores], lr=1.0)
    layer(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert torch.equal(linear.weight, before)


def test_mask_is_recomputed_after_an_optimizer_step():
    layer = bk.MaskedLinear(6, 4, density=0.25)
    first = layer.mask().clone()
    with torch.no_grad():
        layer.scores.copy_(-layer.scores)
    assert not torch.equal(layer.mask(), first)
    assert int(layer.mask().sum()) == 6


@pytest.mark.parametrize("mask_mode", ["selection", "keep"])
def test_mask_follows_scores_whose_storage_is_replaced(mask_mode):
    """``scores.data = ...`` (as ``module.to`` does) keeps the version counter: the cached selection
    must still follow the new storage (the cache key holds its data pointer)."""
    layer = bk.MaskedLinear(6, 4, density=0.25, mask_mode=mask_mode)
    x = torch.randn(3, 6)
    first, y = layer.mask().clone(), layer(x)
    version = layer.scores._version
    layer.scores.data = -layer.scores.detach().clone()
    assert layer.scores._version == version
    want = sort_mask(layer.scores.detach(), 6)
    assert not torch.equal(want, first)
    assert torch.equal(layer.mask(), want)
    torch.testing.assert_close(layer(x), x @ (layer.weight * want).t() + layer.bias, rtol=1e-6, atol=1e-6)
    assert not torch.equal(layer(x), y)


@pytest.mark.parametrize("mask_mode", ["selection", "keep"])
def test_mask_follows_a_changed_density_or_threshold(mask_mode):
    """A schedule that sets ``layer.density`` (or ``threshold``) between steps gets the new rule at once,
    the scores unchanged (the cache key holds the rule)."""
    layer = bk.MaskedLinear(10, 4, density=0.5, mask_mode=mask_mode)
    x = torch.randn(3, 10)
    assert int(layer.mask().sum()) == 20
    layer(x)
    layer.density = 0.1
    assert int(layer.mask().sum()) == 4 and torch.equal(layer.mask(), sort_mask(layer.scores.detach(), 4))
    y = layer(x)
    torch.testing.assert_close(y, x @ (layer.weight * layer.mask()).t() + layer.bias, rtol=1e-6, atol=1e-6)
    gate = bk.ChannelGate(4, threshold=0.0, init=0.5)
    assert bool(gate.mask().all())
    gate.threshold = 1.0
    assert not bool(gate.mask().any())
    assert torch.equal(gate(torch.ones(2, 4, 3)), torch.zeros(2, 4, 3))



@pytest.mark.parametrize("mask_mode", ["selection", "keep"])
def test_a_selection_cached_in_a_cuda_graph_capture_serves_that_capture_only(monkeypatch, mask_mode):
    """What a capture makes is filled only by a replay (functional._capturing, made True here): an eager
    call after it selects again, without a hint from it, and a capture does not take an eager entry
    (its replays must select the scores of then). On a GPU: test_masked_native_eager.py's graph tests."""
    from bise_kernels import functional
    from bise_kernels.nn import _scored

    calls = []

    def counting(scores, density, threshold, hint=None, fused_check=False):
        calls.append(hint)
        return functional.selection(scores, density, threshold, hint=hint, fused_check=fused_check)

    monkeypatch.setattr(_scored, "selection", counting)
    layer, x = bk.MaskedLinear(6, 4, density=0.5, mask_mode=mask_mode), torch.randn(3, 6)
    want = layer(x)
    layer(x)
    assert len(calls) == 1  # cached while the scores stay
    for capturing in (True, True, False, False):
        monkeypatch.setattr(functional, "_capturing", lambda is_cuda, capturing=capturing: capturing)
        torch.testing.assert_close(layer(x), want, rtol=0, atol=0)
    assert len(calls) == 3 and calls[1] is None and calls[2] is None  # one per mode change, no hint across
    layer(x)
    assert len(calls) == 3
def test_mask_model_layerwise_keeps_density_per_layer():
    net = _net()
    scores = bk.mask_model(net, density=0.3, exclude=["5"])
    assert len(scores) == 2 and isinstance(net[5], nn.Linear) and isinstance(net[0], bk.MaskedConv2d)
    for layer in (net[0], net[2]):
        assert int(layer.mask().sum()) == round(0.3 * layer.weight.numel())


def test_mask_model_global_scope_is_one_topk_over_all_layers():
    net = _net()
    scores = bk.mask_model(net, density=0.4, scope="global")
    flat = torch.cat([s.detach().flatten() for s in scores])
    expected = sort_mask(flat, round(0.4 * flat.numel()))
    got = torch.cat([m.mask().flatten() for m in net.modules() if isinstance(m, (bk.MaskedLinear, bk.MaskedConv2d))])
    assert torch.equal(got, expected)
    net(torch.randn(1, 3, 7, 7)).sum().backward()
    assert all(s.grad is not None for s in scores)


@pytest.mark.parametrize("mask_mode", ["selection", "keep"])
def test_global_masks_follow_an_in_place_score_update(mask_mode):
    """The global selection is cached per scores version: an optimiser step (in place) selects again."""
    net = _net()
    scores = bk.mask_model(net, density=0.4, scope="global")
    layers = [m for m in net.modules() if isinstance(m, (bk.MaskedLinear, bk.MaskedConv2d))]
    for layer in layers:
        layer.mask_mode = mask_mode
    x = torch.randn(1, 3, 7, 7)
    net(x)
    before = torch.cat([m.mask().flatten() for m in layers])
    with torch.no_grad():
        scores[1].neg_()  # one layer's scores change: every layer's share of the top-k moves
    flat = torch.cat([s.detach().flatten() for s in scores])
    expected = sort_mask(flat, round(0.4 * flat.numel()))
    assert not torch.equal(expected, before)
    assert torch.equal(torch.cat([m.mask().flatten() for m in layers]), expected)
    if mask_mode == "keep":
        assert torch.equal(torch.cat([m.keep().flatten() for m in layers]), expected)


def test_mask_model_global_with_ties_across_layers_keeps_exactly_k():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    scores = bk.mask_model(net, density=0.5, scope="global", score_init=0.0)
    kept = [int(net[i].mask().sum()) for i in range(2)]
    assert sum(kept) == 10 and kept == [10, 0]  # all tied: lowest global indices (first layer) win
    assert len(scores) == 2


def test_mask_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="scope"):
        bk.mask_model(_net(), density=0.5, scope="net")
    with pytest.raises(ValueError, match="global"):
        bk.mask_model(_net(), threshold=0.0, scope="global")
    with pytest.raises(ValueError, match="no nn.Linear"):
        bk.mask_model(_net(), density=0.5, include=["nothing*"])
    with pytest.raises(ValueError, match="granularity"):
        bk.mask_model(_net(), "row", density=0.5)


def test_modules_refuse_what_they_would_run_differently():
    """Padding other than numeric zeros (a masked conv pads with zeros: reflect or "same" would
    silently change the layer), the wrong module type, a bare layer for mask_model: named errors."""
    for conv in (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(3, 4, 3, padding="same")):
        with pytest.raises(ValueError, match=r"numeric zero padding only, got padding=.*padding_mode="):
            bk.MaskedConv2d.from_dense(conv, density=0.5)
        with pytest.raises(ValueError, match="numeric zero padding only"):
            bk.mask_model(nn.Sequential(conv), density=0.5)
    with pytest.raises(ValueError, match="padding must be an int or a pair of ints for MaskedConv2d, got 'same'"):
        bk.MaskedConv2d(3, 4, 3, padding="same", density=0.5)
    with pytest.raises(TypeError, match="module must be an nn.Linear, got Conv2d"):
        bk.MaskedLinear.from_dense(nn.Conv2d(3, 4, 3), density=0.5)
    with pytest.raises(TypeError, match="module must be an nn.Conv2d, got Linear"):
        bk.MaskedConv2d.from_dense(nn.Linear(3, 4), density=0.5)
    with pytest.raises(ValueError, match="pass a model containing the layer"):
        bk.mask_model(nn.Linear(3, 2), density=0.5)
    for bad in (True, 2.0, -1):
        with pytest.raises(ValueError, match=f"num_channels must be a positive int, got {bad!r}"):
            bk.ChannelGate(bad)


def test_channel_gate_module_modes():
    gate = bk.ChannelGate(3, init=0.0)
    x = torch.randn(2, 3, 4)
    assert torch.equal(gate(x), x)  # zero init keeps every channel
    with torch.no_grad():
        gate.scores[1] = -0.5
    assert torch.equal(gate(x)[:, 1], torch.zeros(2, 4))
    gate.enabled = False
    assert torch.equal(gate(x), x)
    with pytest.raises(ValueError, match="3 channels"):
        bk.ChannelGate(4)(x)


def test_torch_compile_of_a_masked_layer_gives_the_same_result():
    layer = bk.MaskedLinear(8, 5, density=0.5)
    x = torch.randn(3, 8)
    expected = layer(x)
    compiled = torch.compile(layer, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, rtol=0, atol=0)
    compiled(x).sum().backward()
    assert layer.scores.grad is not None


def test_ops_export_with_torch_export():
    layer = bk.MaskedLinear(4, 3, threshold=0.0)
    program = torch.export.export(layer, (torch.randn(2, 4),))
    x = torch.randn(2, 4)
    torch.testing.assert_close(program.module()(x), layer(x))
