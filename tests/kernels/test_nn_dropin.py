"""What mask_model masks in models built from torch's own modules (transformers, lazy, subclassed and
hooked layers), and the masked modules used as nn modules are. Each test failed before its fix."""

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bise_kernels as bk

LOGGER = "bise_kernels.nn.model"


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")  # the plain encoder's path
def test_a_masked_transformer_encoder_applies_its_masks_in_eval_mode(caplog):
    """In eval mode without autograd (no_grad; or frozen weights, mask_model's default, and an input
    without grad) nn.TransformerEncoderLayer runs one fused op that reads linear1.weight and
    linear2.weight itself: the masked layers' masks were not applied (the dense layer's output,
    silently), and with a padding mask nn.TransformerEncoder's nested-tensor path failed inside the
    masked layers. Both paths are now off for masked layers; out_proj, whose weight
    nn.MultiheadAttention reads itself, is left dense with a logged line."""
    enc = _encoder()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert len(bk.mask_model(enc, density=0.3)) == 4
    baked = bk.unmask_model(copy.deepcopy(enc))  # plain layers holding the masked weights
    assert not enc.use_nested_tensor and baked.use_nested_tensor  # unmask_model gives the plain path back
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    enc.eval(), baked.eval()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for kwargs in ({}, {"src_key_padding_mask": pad}):
                got, want = enc(x, **kwargs), baked(x, **kwargs)
                keep = ~pad if kwargs else slice(None)  # padded positions: 0 on the nested path, undefined else
                torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)
                dense = _encoder().eval()(x, **kwargs)
                assert (got - dense).abs().max() > 0.1  # the masks do change this output
    assert [r.getMessage().split(" dense:")[0] for r in caplog.records] == [
        f"mask_model left layers.{i}.self_attn.out_proj" for i in range(2)]


class _Scaled(nn.Linear):
    """A user's subclass whose forward differs from nn.Linear's."""

    def forward(self, input):
        return 2 * super().forward(input)


class _Standardized(nn.Conv2d):
    """A Conv2d subclass computing with a transformed weight (weight standardization, as timm's StdConv2d)."""

    def forward(self, input):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(input, w, self.bias)


def _zoo():
    torch.manual_seed(0)
    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda module, args, out: None)
    return nn.ModuleDict({"mha": nn.MultiheadAttention(4, 2), "sub": _Scaled(4, 4), "lazy": nn.LazyLinear(4),
                          "reflect": nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "hooked": hooked,
                          "std": _Standardized(2, 2, 3), "plain": nn.Linear(4, 2), "conv": nn.Conv2d(2, 2, 3)})


def test_what_mask_model_cannot_mask_for_real_is_left_dense_and_named(caplog):
    """A Linear or Conv2d subclass, an uninitialised LazyLinear, a reflect-padded conv and
    nn.MultiheadAttention's out_proj were skipped silently (or, the conv, raised for the whole model after replacing the
    layers before it); a hooked layer was replaced and lost its hooks. Each is now left dense with one
    logged line naming it and why; the rest is masked."""
    zoo = _zoo()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert len(bk.mask_model(zoo, density=0.5)) == 2
    assert type(zoo["plain"]) is bk.MaskedLinear and type(zoo["conv"]) is bk.MaskedConv2d
    logged = {r.getMessage().split(" dense: ")[0][len("mask_model left "):]: r.getMessage().split(" dense: ")[1]
              for r in caplog.records}
    assert sorted(logged) == ["hooked", "lazy", "mha.out_proj", "reflect", "std", "sub"]
    assert "never calls the module" in logged["mha.out_proj"]
    assert logged["sub"].startswith("_Scaled is a subclass of nn.Linear (a masked layer runs nn.Linear's computation")
    assert "run one forward pass first" in logged["lazy"] and "padding_mode='reflect'" in logged["reflect"]
    assert "hooks (forward_hooks)" in logged["hooked"]
    assert logged["std"].startswith("_Standardized is a subclass of nn.Conv2d")
    assert [type(zoo[k]) for k in ("sub", "lazy", "reflect", "hooked", "std")] == [_Scaled, nn.LazyLinear, nn.Conv2d,
                                                                                   nn.Linear, _Standardized]


def test_a_layer_named_by_include_that_cannot_be_masked_raises_and_changes_nothing():
    """An include pattern that is the layer's exact name asks for it: a named error, before any change."""
    for name, why in (("sub", "subclass of nn.Linear"), ("mha.out_proj", "nn.MultiheadAttention reads"),
                      ("lazy", "not initialised yet")):
        zoo = _zoo()
        with pytest.raises(ValueError, match=rf"cannot mask '{name}' \(named by include\): .*{why}"):
            bk.mask_model(zoo, density=0.5, include=["plain", name])
        assert type(zoo["plain"]) is nn.Linear
    with pytest.raises(ValueError, match="no nn.Linear or nn.Conv2d module to mask .*out_proj left dense: nn.Multi"):
        bk.mask_model(nn.Sequential(nn.MultiheadAttention(4, 2)), density=0.5)


def test_from_dense_refuses_what_it_would_run_differently():
    """from_dense of a subclass built a plain masked layer (the subclass's forward dropped; of a
    masked layer, its mask); of an uninitialised LazyLinear it failed inside the score initialisation."""
    with pytest.raises(TypeError, match="_Scaled is a subclass of nn.Linear"):
        bk.MaskedLinear.from_dense(_Scaled(4, 4), density=0.5)
    with pytest.raises(ValueError, match="LazyConv2d is not initialised yet: run one forward pass first"):
        bk.MaskedConv2d.from_dense(nn.LazyConv2d(4, 3), density=0.5)
    with pytest.raises(TypeError, match=r"MaskedLinear is masked already \(to_dense\(\) gives the plain layer"):
        bk.MaskedLinear.from_dense(bk.MaskedLinear(4, 4, density=0.5), density=0.5)


def test_a_lazy_layer_is_masked_once_initialised():
    net = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.LazyLinear(2))
    net(torch.randn(3, 5))  # LazyLinear becomes nn.Linear at its first call
    assert len(bk.mask_model(net, density=0.5)) == 2 and isinstance(net[2], bk.MaskedLinear)


def test_channel_gate_takes_nn_modules_input_keyword_and_factory_arguments():
    """ChannelGate's forward argument was named x (gate(input=x) raised TypeError, as the masked layers
    did before) and it had no dtype= factory argument (nn modules have device= and dtype=)."""
    gate = bk.ChannelGate(4, density=0.5, init=0.5, device="cpu", dtype=torch.float64)
    assert gate.scores.dtype == torch.float64 and torch.equal(gate.scores, torch.full((4,), 0.5, dtype=torch.float64))
    with torch.no_grad():
        gate.scores.copy_(torch.tensor([0.3, -1.0, 2.0, 0.1]))
    x = torch.randn(2, 4, 3)
    assert torch.equal(gate(input=x), x * torch.tensor([1.0, 0.0, 1.0, 0.0]).reshape(1, 4, 1))
    assert torch.equal(gate(input=x), gate(x))


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, "float16"])
@pytest.mark.parametrize("make", [lambda dtype: bk.ChannelGate(4, dtype=dtype),
                                  lambda dtype: bk.MaskedLinear(4, 3, density=0.5, dtype=dtype),
                                  lambda dtype: bk.MaskedConv2d(2, 3, 3, density=0.5, dtype=dtype)],
                         ids=["ChannelGate", "MaskedLinear", "MaskedConv2d"])
def test_a_factory_dtype_that_is_not_floating_is_named(make, dtype):
    """An integer dtype failed inside nn.Parameter ("Only Tensors of floating point and complex dtype can
    require gradients"), a complex one was built and failed at the first forward, a str inside torch."""
    with pytest.raises(TypeError, match=r"dtype must be None or a floating torch.dtype .*, got "):
        make(dtype)


@pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")  # torch 2.13 deprecates it
def test_torch_jit_script_is_refused_with_what_works_instead():
    """torch.jit.script of a masked model failed inside TorchScript's compiler ("Module 'MaskedLinear'
    has no attribute '__dict__'", ChannelGate: "Unknown type annotation: 'nn.Parameter'"): it now
    names the module and the ways that work."""
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), bk.ChannelGate(4), nn.Linear(4, 2))
    for make in (lambda: net[2], lambda: bk.mask_model(net, density=0.5) and net):
        with pytest.raises(TypeError, match=r"torch.jit.script cannot compile (ChannelGate|MaskedLinear): trace it"):
            torch.jit.script(make())
    assert isinstance(torch.jit.script(bk.unmask_model(nn.Sequential(*[m for m in net if m is not net[2]]))),
                      torch.jit.ScriptModule)


@pytest.mark.parametrize("mask_mode", ["selection", "keep"])
def test_a_frozen_mask_keeps_its_selection_and_costs_no_score_gradient(backend, mask_mode):
    """scores.requires_grad_(False) with frozen weights (a fixed mask; only the input needs a
    gradient): the backward makes grad_x only (FlopCounterMode: no dL/dW_eff GEMM for the scores)
    and the cached selection serves every call. Not a defect found: the guard of a verified claim."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8))
    bk.mask_model(net, density=0.5)
    layer = net[0]
    layer.mask_mode = mask_mode
    x = torch.randn(4, 16, requires_grad=True)
    for frozen, gemms in ((False, 3), (True, 2)):  # forward, grad_x, and dL/dW_eff for trainable scores
        layer.scores.requires_grad_(not frozen)
        with FlopCounterMode(display=False) as counter:
            net(x).sum().backward()
        assert counter.get_total_flops() == gemms * 2 * 4 * 16 * 8, frozen
    entry = layer._cache
    net(x).sum().backward()
    assert layer._cache is entry


@pytest.mark.parametrize("mask_mode", ["selection", "keep"])
def test_a_dtype_or_device_conversion_is_selected_again(mask_mode):
    """nn.Module's conversions (.half(), .float(), .to(), .cuda()) set ``param.data``: the scores stay
    the same tensor at the same version, and a freed block can come back at the same address:
    ``.half().float()`` served the selection of the values before the fp16 rounding (seen 1 round
    trip in 17 on the CPU; a caching CUDA allocator returns the block by design). A conversion now
    drops the caches. Here it lands at the old address deterministically: a tensor over the scores'
    own memory, written after the conversion through numpy (no version bump), as the new block is."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    bk.mask_model(net, density=0.25)
    glob = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    bk.mask_model(glob, density=0.25, scope="global")
    gate = nn.Sequential(bk.ChannelGate(6, density=0.5, init=0.5))
    x = torch.randn(2, 6)
    for model in (net, glob, gate):
        for m in model:
            if not isinstance(m, bk.ChannelGate):
                m.mask_mode = mask_mode
            with torch.no_grad():
                m.scores.normal_()
        model(x)  # caches every selection
        memory = {id(m.scores): m.scores.detach().numpy() for m in model}

        def convert(t):
            if id(t) not in memory:
                return t
            same_address = torch.from_numpy(memory[id(t)])
            memory[id(t)] *= -1.0  # what the new block holds
            return same_address

        before = [m.scores.data_ptr() for m in model]
        model._apply(convert)
        assert [m.scores.data_ptr() for m in model] == before
        scores = [m.scores.detach() for m in model]
        masks = (bk.global_topk_masks(scores, 0.25) if model is glob else
                 [bk.topk_mask(s, m.density) for s, m in zip(scores, model)])
        for m, want in zip(model, masks):
            assert torch.equal(m.mask(), want)
        if model is not gate:
            h = F.linear(x, model[0].weight * masks[0], model[0].bias)
            torch.testing.assert_close(model(x), F.linear(h, model[1].weight * masks[1], model[1].bias))


def test_a_pattern_string_for_include_or_exclude_is_refused():
    """include / exclude take a list of patterns: a str was read as one pattern per character, so
    exclude="2.0" excluded module "0" and masked "2.0" (silently)."""
    for kwargs in ({"exclude": "2.0"}, {"include": "2.0"}, {"include": ["2.0", 3]}):
        net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2)))
        with pytest.raises(TypeError, match=r"(in|ex)clude must be a list of module-name patterns \(fnmatch\) or None"):
            bk.mask_model(net, density=0.5, **kwargs)
        assert type(net[0]) is nn.Linear
    bk.mask_model(net, density=0.5, exclude=("2.0",))
    assert [type(m) for m in (net[0], net[1], net[2][0])] == [bk.MaskedLinear, bk.MaskedLinear, nn.Linear]


def test_an_exclude_pattern_that_matches_no_layer_is_named():
    """An unnamed Sequential's classifier is "2", not "fc": exclude=["fc"] silently masked it too (and
    put it in the global top-k). Now a ValueError naming the pattern and the layers, the model unchanged;
    a pattern that matches is taken as before."""
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"exclude pattern\(s\) \['fc'\] match no nn.Linear or nn.Conv2d module "
                                         r".*those are: 0, 2$"):
        bk.mask_model(net, density=0.5, scope="global", exclude=["2", "fc"])
    assert [type(m) for m in net] == [nn.Linear, nn.ReLU, nn.Linear]
    bk.mask_model(net, density=0.5, scope="global", exclude=["2"])
    assert [type(m) for m in net] == [bk.MaskedLinear, nn.ReLU, nn.Linear]
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    bk.mask_model(net, density=0.5, exclude={"0"})  # a set of patterns is a collection of patterns too
    assert [type(m) for m in net] == [nn.Linear, nn.ReLU, bk.MaskedLinear]




def test_an_include_pattern_that_is_not_an_exact_name_leaves_unmaskable_layers_dense(caplog):
    """Only an include pattern that is a layer's exact name asks for it: include=["*"] masks what can be
    masked and logs the rest, as no include does."""
    zoo = _zoo()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert len(bk.mask_model(zoo, density=0.5, include=["*"])) == 2
    assert type(zoo["plain"]) is bk.MaskedLinear and "mha.out_proj" in caplog.text


def test_a_shared_layer_included_under_one_name_is_masked_under_both():
    shared = nn.Linear(4, 4)
    net = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    bk.mask_model(net, density=0.5, include=["a.*"])
    assert type(net["a"][0]) is bk.MaskedLinear and net["b"][0] is net["a"][0]


def test_a_layer_with_a_backward_hook_is_left_dense(caplog):
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    net[0].register_full_backward_hook(lambda module, gin, gout: None)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        bk.mask_model(net, density=0.5)
    assert type(net[0]) is nn.Linear and type(net[1]) is bk.MaskedLinear
    assert "backward_hooks" in caplog.text


def test_masking_an_encoder_in_two_calls_then_unmasking_restores_its_nested_tensor_path():
    encoder = _encoder()
    assert encoder.use_nested_tensor
    bk.mask_model(encoder, density=0.5, include=["layers.0.linear1"])
    bk.mask_model(encoder, density=0.5, include=["layers.1.linear1"])
    assert not encoder.use_nested_tensor
    bk.unmask_model(encoder)
    assert encoder.use_nested_tensor


def test_restore_fused_path_keeps_the_nested_path_off_while_masked_layers_remain():
    """bise's remove_gates calls restore_fused_path: masked layers still in the encoder keep it off."""
    from bise_kernels.nn.model import restore_fused_path

    encoder = _encoder()
    bk.mask_model(encoder, density=0.5)
    restore_fused_path(encoder)
    assert not encoder.use_nested_tensor


def test_flop_counter_counts_the_weight_gradient_of_trainable_weights_under_frozen_scores(backend):
    from torch.utils.flop_counter import FlopCounterMode

    net = nn.Sequential(nn.Linear(16, 8))
    bk.mask_model(net, density=0.5, freeze_weights=False)
    net[0].scores.requires_grad_(False)
    x = torch.randn(4, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * 4 * 16 * 8  # forward, grad_x, dL/dW_eff for the weight


def test_mask_model_names_an_unknown_scope_and_a_model_masked_already():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="scope must be 'layerwise' or 'global', got 'bogus'"):
        bk.mask_model(net, density=0.3, scope="bogus")
    assert not any(isinstance(m, bk.MaskedLinear) for m in net.modules())  # refused before any layer changed
    bk.mask_model(net, density=0.3)
    with pytest.raises(ValueError, match="its 2 masked layers are masked already: unmask_model first"):
        bk.mask_model(net, density=0.3)
