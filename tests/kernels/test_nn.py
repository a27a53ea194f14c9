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


def test_from_dense_default_score_init_depends_on_granularity():
    """from_dense without score_init: "kaiming" per weight, "zeros" per channel (every unit starts tied)."""
    torch.manual_seed(0)
    for wrap, dense in ((bk.MaskedLinear.from_dense, nn.Linear(6, 4)), (bk.MaskedConv2d.from_dense, nn.Conv2d(2, 4, 3))):
        assert torch.equal(wrap(dense, "channel", density=0.5).scores, torch.zeros(4))
        per_weight = wrap(dense, "weight", density=0.5).scores
        assert per_weight.shape == dense.weight.shape and bool((per_weight != 0).all())


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
    """The global selection is cached per scores version and density: an optimiser step (in place), or a
    new density, selects again."""
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
    net(x)
    layers[0].global_selector.density = 0.2  # a new density selects again (the cache served the old one)
    assert [m.density for m in layers] == [0.2] * len(layers)
    expected = sort_mask(flat, round(0.2 * flat.numel()))
    assert torch.equal(torch.cat([m.mask().flatten() for m in layers]), expected)
    if mask_mode == "keep":
        assert torch.equal(torch.cat([m.keep().flatten() for m in layers]), expected)
    layers[1].density = 0.3  # on one layer alone: ignored without a word before, now named
    with pytest.raises(ValueError, match=r"this layer's density 0.3 differs from its global selection's 0.2"):
        net(x)


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
    """A padding mode other than zeros (a masked conv pads with zeros: reflect would silently change
    the layer), an unknown padding, the wrong module type, a bare layer for mask_model: named errors."""
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"padding_mode='zeros' only, got padding_mode='reflect'"):
        bk.MaskedConv2d.from_dense(conv, density=0.5)
    with pytest.raises(ValueError, match=r"padding_mode='zeros' only"):
        bk.mask_model(nn.Sequential(conv), density=0.5)
    with pytest.raises(ValueError, match="padding must be an int, a pair of ints, 'valid' or 'same', got 'full'"):
        bk.MaskedConv2d(3, 4, 3, padding="full", density=0.5)
    with pytest.raises(TypeError, match="module must be an nn.Linear, got Conv2d"):
        bk.MaskedLinear.from_dense(nn.Conv2d(3, 4, 3), density=0.5)
    with pytest.raises(TypeError, match="module must be an nn.Conv2d, got Linear"):
        bk.MaskedConv2d.from_dense(nn.Linear(3, 4), density=0.5)
    with pytest.raises(ValueError, match="pass a model containing the layer"):
        bk.mask_model(nn.Linear(3, 2), density=0.5)
    for bad in (True, 2.0):
        with pytest.raises(TypeError, match=f"num_channels must be an int, got {bad!r}"):
            bk.ChannelGate(bad)
    with pytest.raises(ValueError, match="num_channels must be a positive int, got -1"):
        bk.ChannelGate(-1)


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


@pytest.mark.parametrize("mask_mode", ["selection", "keep"])
@pytest.mark.parametrize("make", [lambda: bk.MaskedConv2d(3, 4, 3, padding=1, density=0.5),
                                  lambda: bk.MaskedLinear(5, 4, threshold=0.0)], ids=["conv", "linear"])
def test_gradient_checkpointing_gives_the_same_gradients(backend, make, mask_mode):
    """torch.utils.checkpoint (non-reentrant) unpacks each saved tensor once: a backward that read
    ctx.saved_tensors twice (the conv's layout probe) raised a CheckpointError on "torch" / "triton"."""
    torch.manual_seed(0)
    layer = make()
    layer.mask_mode = mask_mode
    x = torch.randn(2, 3, 5, 5) if isinstance(layer, nn.Conv2d) else torch.randn(2, 3, 5)
    grads = []
    for checkpointed in (False, True):
        layer.zero_grad()
        xr = x.clone().requires_grad_(True)
        y = torch.utils.checkpoint.checkpoint(layer, xr, use_reentrant=False) if checkpointed else layer(xr)
        y.square().sum().backward()
        grads.append((xr.grad, layer.weight.grad, layer.bias.grad, layer.scores.grad))
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: bk.MaskedLinear(0, 4, density=0.5),
                                  lambda: bk.MaskedLinear(8, 0, threshold=0.0, granularity="channel"),
                                  lambda: bk.MaskedConv2d(3, 0, 3, density=0.5),
                                  lambda: bk.MaskedLinear.from_dense(nn.Linear(0, 4), density=0.5)],
                         ids=["in_features", "out_features", "out_channels", "from_dense"])
def test_a_layer_without_weights_is_a_named_error(make):
    """Nothing to select from: a ValueError naming the weight's shape at construction (the kaiming
    score init raised ZeroDivisionError, the others an IndexError)."""
    with pytest.raises(ValueError, match=r"no weight to mask.*shape \((0, 4|4, 0|0, 8|0, 3, 3, 3)\)"):
        make()


def _cached_modules():
    """Modules whose selection (or keep mask) is cached, each with an input."""
    torch.manual_seed(0)
    x, xc = torch.randn(2, 6), torch.randn(2, 2, 4, 4)
    cases = [(bk.ChannelGate(6, density=0.5), x), (bk.ChannelGate(6, threshold=0.1), x)]
    for mode in ("selection", "keep"):
        cases += [(bk.MaskedLinear(6, 4, density=0.5, mask_mode=mode), x),
                  (bk.MaskedLinear(6, 4, threshold=0.1, mask_mode=mode), x),
                  (bk.MaskedConv2d(2, 3, 3, density=0.5, mask_mode=mode), xc)]
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    bk.mask_model(net, density=0.5, scope="global")
    return cases + [(net, x)]


def test_a_selection_cached_in_inference_mode_serves_training(backend):
    """Evaluating under torch.inference_mode (before training, or between steps) cached inference
    tensors that the next training forward saved for backward: a RuntimeError. The selection and the
    keep mask are made outside inference mode; the gradients equal those of a module never evaluated."""
    for module, x in _cached_modules():
        fresh = copy.deepcopy(module)
        with torch.inference_mode():
            evaluated = module(x)
        y = module(x)
        torch.testing.assert_close(y, evaluated, rtol=0, atol=0)
        y.square().sum().backward()
        fresh(x).square().sum().backward()
        for p, q in zip(module.parameters(), fresh.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


def test_writing_into_a_returned_selection_changes_no_layer():
    """A threshold's (thr, cut) is one cached pair shared by every layer and call with that threshold:
    selection() returns a copy, so a caller writing into it changes no layer's mask."""
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    for module in _cached_modules()[:-1]:
        m, xm = module
        want = m(xm)
        thr, cut = m.selection()
        thr.fill_(100.0)
        cut.fill_(0)
        torch.testing.assert_close(m(xm), want, rtol=0, atol=0)
    a, b = bk.ChannelGate(4, threshold=0.0), bk.ChannelGate(4, threshold=0.0)
    want = b(x)
    a.selection()[0].fill_(100.0)
    torch.testing.assert_close(b(x), want, rtol=0, atol=0)
    torch.testing.assert_close(bk.channel_gate(x, b.scores, threshold=0.0), want, rtol=0, atol=0)

@pytest.mark.parametrize("padding, kernel, dilation", [("same", 3, 1), ("same", (3, 5), (2, 1)), ("valid", 3, 1)])
def test_string_padding_and_zeros_padding_mode_are_taken_as_nn_conv2d_does(padding, kernel, dilation):
    """nn.Conv2d's padding="same" / "valid" and padding_mode="zeros": MaskedConv2d refused them, and so
    mask_model refused a model built with them. Symmetric "same" padding becomes its numbers."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel, padding=padding, dilation=dilation, padding_mode="zeros")
    x = torch.randn(1, 2, 7, 8)
    net = nn.Sequential(conv)
    dense = conv(x)
    bk.mask_model(net, density=1.0)
    torch.testing.assert_close(net(x), dense, rtol=0, atol=0)
    layer = bk.MaskedConv2d(2, 3, kernel, padding=padding, dilation=dilation, padding_mode="zeros", density=1.0)
    with torch.no_grad():
        layer.weight.copy_(conv.weight)
        layer.bias.copy_(conv.bias)
    torch.testing.assert_close(layer(x), dense, rtol=0, atol=0)
    torch.testing.assert_close(layer.to_dense()(x), dense, rtol=0, atol=0)


def test_padding_a_masked_conv_cannot_take_is_named():
    with pytest.raises(ValueError, match="padding='same' with kernel_size .2, 2."):
        bk.MaskedConv2d(2, 3, 2, padding="same", density=0.5)  # one more row of padding below than above
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        bk.MaskedConv2d(2, 3, 3, padding=1, padding_mode="reflect", density=0.5)
    with pytest.raises(ValueError, match="padding_mode='circular'"):
        bk.MaskedConv2d.from_dense(nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"), density=0.5)
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):  # as nn.Conv2d refuses it
        bk.MaskedConv2d(2, 3, 3, stride=2, padding="same", density=0.5)
    with pytest.raises(ValueError, match="padding='same' with kernel_size .3, 2."):  # asymmetric in width only
        bk.MaskedConv2d(2, 3, (3, 2), padding="same", density=0.5)


def test_unmask_model_bakes_every_masked_layer_into_a_plain_one():
    """The inverse of mask_model (as torch.nn.utils.prune.remove): plain nn.Linear / nn.Conv2d layers, the
    same outputs, no scores left in the state dict, the original weights untouched."""
    net = _net()
    originals = list(net.parameters())
    before = [p.detach().clone() for p in originals]
    bk.mask_model(net, density=0.4, scope="global")
    x = torch.randn(2, 3, 7, 7)
    masked = net(x)
    assert bk.unmask_model(net) is net
    assert {type(m) for m in net.modules()} == {nn.Sequential, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear}
    torch.testing.assert_close(net(x), masked, rtol=0, atol=0)
    assert not any("scores" in key for key in net.state_dict())
    assert sum(int((p == 0).sum()) for name, p in net.named_parameters() if name.endswith("weight")) > 0
    with pytest.raises(ValueError, match="to_dense"):
        bk.unmask_model(bk.MaskedLinear(3, 2, density=0.5))
    assert all(torch.equal(a, b) for a, b in zip(originals, before))


def test_repr_shows_what_was_set():
    """A sigmoid layer's temperature, a non-default mask mode and a global scope were not in the repr."""
    layer = bk.MaskedLinear(3, 2, density=0.5, estimator="sigmoid", temperature=0.5, mask_mode="keep")
    assert repr(layer).endswith("density=0.5, estimator=sigmoid, temperature=0.5, mask_mode=keep)")
    assert repr(bk.MaskedLinear(3, 2, threshold=0.0)).endswith("granularity=weight, threshold=0.0, estimator=ste)")
    net = _net()
    bk.mask_model(net, density=0.3, scope="global")
    assert "density=0.3, estimator=ste, scope=global)" in repr(net[0])


def test_a_fullgraph_compile_before_any_eager_call_traces(monkeypatch):
    """torch.compile(fullgraph=True) as the first call of a process: the finiteness check asked the
    registry, whose cold backends import their modules, which dynamo cannot trace (Unsupported). The
    check is skipped while tracing (values are unknown), so the registry is not asked."""
    from bise_kernels import backends

    for name, b in list(backends.BACKENDS.items()):  # as in a fresh process: no backend loaded yet
        monkeypatch.setitem(backends.BACKENDS, name, backends.Backend(b.name, b.devices, b.modules))
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(bk.MaskedConv2d(3, 4, 3, padding=1, density=0.5), bk.ChannelGate(4, density=0.5),
                        nn.Flatten(), bk.MaskedLinear(4 * 25, 5, density=0.5),
                        bk.MaskedLinear(5, 3, threshold=0.0, mask_mode="keep"))
    x = torch.randn(2, 3, 5, 5)
    compiled = torch.compile(net, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(compiled, net(x), rtol=0, atol=0)


def _tied_global_net():
    """Three layers, every score 0.0: the global top-k cuts the one tie group inside layer 2."""
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3), nn.Linear(3, 2))
    bk.mask_model(net, density=0.8, scope="global")
    for m in net:
        with torch.no_grad():
            m.scores.zero_()
    return net


def test_global_ties_over_three_layers_keep_the_first_k_in_order():
    net = _tied_global_net()
    sizes = [m.scores.numel() for m in net]
    k = round(0.8 * sum(sizes))
    want = torch.arange(sum(sizes)) < k
    got = torch.cat([m.mask().flatten() for m in net])
    assert torch.equal(got, want)


def test_a_compiled_global_selection_gives_each_layer_its_offset():
    torch.manual_seed(0)
    net, x = _tied_global_net(), torch.randn(2, 4)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(net, backend="eager", fullgraph=True)(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_replacing_the_scores_data_is_selected_again(scope):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    bk.mask_model(net, density=0.25, scope=scope)
    net(torch.randn(2, 6))
    net[0].scores.data = torch.randn(4, 6)  # a new tensor: same version, another address
    scores = [m.scores.detach() for m in net]
    want = (bk.global_topk_masks(scores, 0.25) if scope == "global" else [bk.topk_mask(s, 0.25) for s in scores])
    for m, w in zip(net, want):
        assert torch.equal(m.mask(), w)


def test_the_backward_runs_on_the_forwards_backend(monkeypatch):
    """use_backend is per thread and may not hold when autograd runs the backward (on CUDA, a device
    thread): the backward takes the backend the forward ran on."""
    from bise_kernels import backends

    calls = []
    kernels = backends.BACKENDS["torch"].kernels()
    real = kernels["masked_linear_backward"]
    monkeypatch.setitem(kernels, "masked_linear_backward", lambda *a: calls.append(1) or real(*a))
    layer = bk.MaskedLinear(5, 4, density=0.5)
    with bk.use_backend("torch"):
        y = layer(torch.randn(2, 5))
    with bk.use_backend("cpp" if "cpp" in bk.available_backends("cpu") else "triton"):
        y.sum().backward()
    assert calls
