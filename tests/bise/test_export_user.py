"""Export of user architectures (docs/method.md section 15): the exported model equals the masked one
(<= 1e-5, fp32, eval; also after save_exported / load_exported) or an ExportError names the blocker,
never a crash inside Torch-Pruning. Random gates with many channels off, and every gate off."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bise_kernels.nn import ChannelGate

from bise.export import (ExportError, FixedGate, export_subnetwork, freeze_gates, load_exported, max_abs_diff,
                         save_exported)
from bise.flops import count_macs, count_params
from bise.gates import Gated, gates_of, insert_gates

SHAPE = (3, 8, 8)


def _convs(mid: nn.Module, tail: int = 8) -> nn.Sequential:
    """stem conv (ungated) -> ``mid`` (``tail`` channels out) -> global pool -> Linear: a small user CNN."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), mid,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(tail, 5))


class Tokens(nn.Module):
    """(N, L, C) MLP block with a residual add; ``norm``: LayerNorm between the Linear and its GELU."""

    def __init__(self, norm: bool):
        super().__init__()
        self.f1, self.f2, self.fc = nn.Linear(24, 32), nn.Linear(32, 24), nn.Linear(24, 5)
        self.norm = nn.LayerNorm(32) if norm else nn.Identity()
        self.act = nn.GELU()

    def forward(self, x):
        t = x.reshape(len(x), 8, 24)
        return self.fc((t + self.f2(self.act(self.norm(self.f1(t))))).mean(1))


class Dense(nn.Module):
    """DenseNet-like: each block (BN-ReLU-conv) reads the torch.cat of every earlier feature map."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 4, 3, padding=1))
                                    for c in (8, 12, 16))
        self.fc = nn.Linear(20, 5)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = torch.cat([h, block(h)], 1)
        return self.fc(h.mean((2, 3)))


class Conv1dNet(nn.Module):
    """(N, C, L) features: Conv1d -> BN -> ReLU, then Conv1d -> ReLU (+ the input: ``residual``)."""

    def __init__(self, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.c1, self.b1, self.a1 = nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU()
        self.c2, self.a2, self.fc = nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(), nn.Linear(8, 5)

    def forward(self, x):
        h = self.a1(self.b1(self.c1(x.flatten(2))))
        h = self.a2(self.c2(h) + h if self.residual else self.c2(h))
        return self.fc(h.mean(2))


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle (view, transpose, reshape): a channel coupling Torch-Pruning misses."""

    def __init__(self):
        super().__init__()
        self.c1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.c2, self.a2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Linear(8, 5)

    def forward(self, x):
        h = self.a1(self.c1(x))
        n, c, height, width = h.shape
        h = h.view(n, 2, c // 2, height, width).transpose(1, 2).reshape(n, c, height, width)
        return self.fc(self.a2(self.c2(h)).mean((2, 3)))


class Block(nn.Module):
    """Residual block, projection shortcut where the shape changes; ``pre``: BN-ReLU-conv order."""

    def __init__(self, cin: int, cout: int, stride: int, pre: bool):
        super().__init__()
        self.pre = pre
        self.n1, self.a1 = nn.BatchNorm2d(cin if pre else cout), nn.ReLU()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n2, self.a2 = nn.BatchNorm2d(cout), nn.ReLU()
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n3 = nn.Identity() if pre else nn.BatchNorm2d(cout)
        self.a3 = nn.Identity() if pre else nn.ReLU()
        self.short = nn.Identity() if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        if self.pre:
            h = self.a1(self.n1(x))
            return self.c2(self.a2(self.n2(self.c1(h)))) + self.short(h if isinstance(self.short, nn.Conv2d) else x)
        return self.a3(self.n3(self.c2(self.a2(self.n2(self.c1(x))))) + self.short(x))


class SqueezeExcite(nn.Module):
    """conv -> ReLU, scaled channel-wise by sigmoid(fc(relu(fc(mean)))) from a side branch -> conv."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1, self.a1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        self.f1, self.fa, self.f2, self.sig = nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 16), nn.Sigmoid()
        self.c2, self.a2, self.fc = nn.Conv2d(16, 8, 3, padding=1), nn.SiLU(), nn.Linear(8, 5)

    def forward(self, x):
        h = self.a1(self.n1(self.c1(x)))
        h = h * self.sig(self.f2(self.fa(self.f1(h.mean((2, 3))))))[:, :, None, None]
        return self.fc(self.a2(self.c2(h)).mean((2, 3)))


class Inception1d(nn.Module):
    """(N, C, L) features: the ReLU reads a torch.cat of two Conv1d outputs (no norm between)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.act = nn.Conv1d(3, 4, 3, padding=1), nn.Conv1d(3, 4, 1), nn.ReLU()
        self.c, self.act2, self.fc = nn.Conv1d(8, 8, 1), nn.ReLU(), nn.Linear(8, 5)

    def forward(self, x):
        x = x.flatten(2)
        return self.fc(self.act2(self.c(self.act(torch.cat([self.a(x), self.b(x)], 1)))).mean(2))


class Functional1d(nn.Module):
    """(N, C, L) features through functional activations: the ReLU module reads F.silu(conv) + F.gelu(conv)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.act = nn.Conv1d(3, 8, 3, padding=1), nn.Conv1d(8, 8, 3, padding=1), nn.ReLU()
        self.c3, self.act2, self.fc = nn.Conv1d(8, 8, 1), nn.ReLU(), nn.Linear(8, 5)

    def forward(self, x):
        h = F.gelu(self.c1(x.flatten(2)))
        return self.fc(self.act2(self.c3(self.act(F.silu(self.c2(h)) + h))).mean(2))


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block: depthwise conv, then channels last (N, H, W, C): LayerNorm, Linear, GELU, Linear."""

    def __init__(self):
        super().__init__()
        self.dw, self.norm = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.LayerNorm(8)
        self.p1, self.act, self.p2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

    def forward(self, x):
        y = self.p2(self.act(self.p1(self.norm(self.dw(x).permute(0, 2, 3, 1)))))
        return x + y.permute(0, 3, 1, 2)


class SharedConv(nn.Module):
    """One conv applied twice, each call followed by its own ReLU."""

    def __init__(self):
        super().__init__()
        self.conv, self.a1, self.a2 = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.ReLU()

    def forward(self, x):
        return self.a2(self.conv(self.a1(self.conv(x))))


def _norm_block(norm) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), norm(), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), norm(), nn.ReLU())


def _bn_block(**bn) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, **bn), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, **bn), nn.ReLU())


BUILDERS = {
    "resnet": lambda: _convs(nn.Sequential(Block(8, 8, 1, False), Block(8, 16, 2, False)), tail=16),
    "preact_resnet": lambda: _convs(nn.Sequential(Block(8, 8, 1, True), Block(8, 16, 2, True),
                                                  nn.BatchNorm2d(16), nn.ReLU()), tail=16),
    "depthwise_separable": lambda: _convs(nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 16, 1, bias=False),
        nn.BatchNorm2d(16), nn.Hardswish()), tail=16),
    "squeeze_excite": SqueezeExcite,
    "flatten_linear": lambda: nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.SiLU(), nn.Conv2d(6, 8, 3),
                                            nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4, 12),
                                            nn.LeakyReLU(0.1), nn.Linear(12, 5)),
    "act_then_bn": lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GELU(), nn.BatchNorm2d(6),
                                         nn.Conv2d(6, 8, 3), nn.Sigmoid(), nn.BatchNorm2d(8), nn.Flatten(),
                                         nn.Linear(8 * 36, 5)),
    "mlp_dropout": lambda: nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Dropout(0.5),
                                         nn.Linear(32, 16), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(16, 5)),
    "tokens": lambda: Tokens(norm=False),
    "no_bias_no_bn": lambda: _convs(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(),
                                                  nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU())),
    "shared_conv": lambda: _convs(SharedConv()),
    "grouped2": lambda: _convs(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                                             nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU())),
    "grouped4": lambda: _convs(nn.Sequential(nn.Conv2d(8, 8, 1, groups=4), nn.ReLU(), nn.Conv2d(8, 8, 1))),
    "depthwise_x2": lambda: _convs(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.ReLU(),
                                                 nn.Conv2d(16, 8, 1), nn.ReLU())),
    "groupnorm4": lambda: _convs(_norm_block(lambda: nn.GroupNorm(4, 8))),
    "groupnorm1": lambda: _convs(_norm_block(lambda: nn.GroupNorm(1, 8))),
    "groupnorm_per_channel": lambda: _convs(_norm_block(lambda: nn.GroupNorm(8, 8))),
    "gate_groupnorm_1x1": lambda: _convs(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.GroupNorm(4, 8),
                                                       nn.Conv2d(8, 8, 1), nn.ReLU())),
    "tokens_layernorm": lambda: Tokens(norm=True),
    "dense_cat": Dense,
    "gate_instancenorm_conv": lambda: _convs(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.GroupNorm(8, 8),
                                                           nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())),
    "bn_batch_stats": lambda: _convs(_bn_block(track_running_stats=False)),
    "bn_affine_false": lambda: _convs(_bn_block(affine=False)),
}


def _gated(name: str, seed: int, mode: str) -> nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    insert_gates(model, example_input=torch.rand(2, *SHAPE))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.affine:  # non-zero shifts: dead channels
                m.weight.uniform_(0.5, 1.5, generator=gen)                   # become constants downstream
                m.bias.uniform_(-0.3, 0.6, generator=gen)
        for g in gates_of(model).values():
            g.scores.copy_(torch.rand(g.num_channels, generator=gen) - 0.6 if mode == "random" else -1.0)
    return model.eval()


@pytest.fixture(scope="module")
def x():
    return torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(1))


def _check(model, x, tmp_path=None, **kwargs):
    exported = export_subnetwork(model, example_input=x, **kwargs)
    assert max_abs_diff(freeze_gates(model), exported, x) <= 1e-5
    if tmp_path is not None:
        path = str(tmp_path / "e.pt")
        save_exported(exported, path)
        assert max_abs_diff(exported, load_exported(path, model=model), x) == 0.0
    return exported


@pytest.mark.parametrize("name", ["resnet", "preact_resnet", "depthwise_separable", "squeeze_excite",
                                  "flatten_linear", "act_then_bn", "mlp_dropout", "tokens", "no_bias_no_bn",
                                  "shared_conv"])
@pytest.mark.parametrize("mode", ["random", "all_off"])
def test_user_architectures_exact_and_smaller(name, mode, x, tmp_path):
    """Probes that passed before this file: residual (projection, pre-activation), depthwise, SE, flatten,
    non-zero-at-0 activations, a gate before BN, dropout, (N, L, C) tokens, bias-free convs, a conv run twice."""
    model = _gated(name, 0, mode)
    exported = _check(model, x, tmp_path)
    gate_params = sum(count_params(g) for g in gates_of(model).values())
    assert count_params(exported) < count_params(model) - gate_params or name == "shared_conv"  # reads the stem


@pytest.mark.parametrize("name", ["grouped2", "grouped4", "depthwise_x2"])
@pytest.mark.parametrize("mode", ["random", "all_off"])
def test_grouped_convs_keep_their_channels(name, mode, x):
    """A grouped (not depthwise) conv cannot lose single channels: Torch-Pruning produced a weight the
    conv rejects ('expected weight to be divisible by 2') or an out-of-range index. They now stay."""
    model = _gated(name, 0, mode)
    _check(model, x)


@pytest.mark.parametrize("name", ["groupnorm4", "groupnorm1", "gate_groupnorm_1x1", "tokens_layernorm"])
@pytest.mark.parametrize("mode", ["random", "all_off"])
def test_channel_mixing_norms_keep_their_channels(name, mode, x, tmp_path):
    """GroupNorm with several channels per group and LayerNorm normalise over channels: removing one
    changes the statistics (the export raised 'differs from the masked model by 0.12') or leaves a
    width the groups do not divide (a crash in GroupNorm's forward). Those channels now stay, but for
    whole GroupNorm groups (test_whole_groupnorm_groups_go)."""
    _check(_gated(name, 0, mode), x, tmp_path)


@pytest.mark.parametrize("round_to", [None, 2, 4])
def test_whole_groupnorm_groups_go(round_to, x, tmp_path):
    """A GroupNorm group whose channels are all dead goes whole (num_groups follows); a group with a live
    channel keeps its dead ones (its statistics read them). They all stayed before."""
    model = _gated("groupnorm4", 0, "random")
    gates = gates_of(model)
    with torch.no_grad():  # GroupNorm(4, 8), groups of 2: (0, 1) partly dead, (2, 3) dead, (4, 5) live, (6, 7) partly
        gates["3.2"].scores.copy_(torch.tensor([1.0, -1, -1, -1, 1, 1, -1, 1]))
        gates["3.5"].scores.copy_(torch.tensor([-1.0, -1, 1, 1, -1, -1, -1, -1]))  # group (2, 3) only lives
    exported = _check(model, x, tmp_path, round_to=round_to)
    norms = [(m.num_groups, m.num_channels) for m in exported.modules() if isinstance(m, nn.GroupNorm)]
    if round_to in (None, 2):
        assert norms == [(3, 6), (1, 2)]
    else:  # 6 is no multiple of 4: the first stays whole; the second keeps 4 channels, two whole groups
        assert norms == [(4, 8), (2, 4)]


def test_per_channel_groupnorm_loses_channels(x, tmp_path):
    """GroupNorm(C, C) is per-channel: its channels go, and num_groups follows (Torch-Pruning kept it)."""
    model = _gated("groupnorm_per_channel", 0, "random")
    exported = _check(model, x, tmp_path)
    norm = exported[3][1]
    assert norm.num_groups == norm.num_channels < 8 and count_params(exported) < count_params(model)


@pytest.mark.parametrize("mode", ["random", "all_off"])
def test_concat_never_empties_a_conv(mode, x, tmp_path):
    """torch.cat joins several producers under one gate: keeping one channel per gate let a later gate
    take a producer's last filter (the stem conv went to 0 filters and the export crashed in conv2d)."""
    model = _gated("dense_cat", 0, mode)
    exported = _check(model, x, tmp_path)
    assert all(m.out_channels >= 1 for m in exported.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("round_to", [2, 4, 8])
@pytest.mark.parametrize("seed, mode", [(0, "all_off"), (2, "random"), (4, "random"), (5, "random")])
def test_concat_keeps_every_layer_and_gate_at_round_to(seed, mode, round_to, x):
    """Behind a torch.cat a later gate narrows the producers of earlier ones: rounding each gate's count
    alone left the stem conv at 7 filters and its gates at 7 channels (seed 2, any round_to), the all-off
    net's last gate at 6 of 16 at round_to=4, a block's conv at 1 of 4 filters. Every layer's filters,
    and so every gate's channels, are now a multiple of round_to or all they were."""
    model = _gated("dense_cat", seed, mode)
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    widths.update((n, g.num_channels) for n, g in gates_of(model).items())
    exported = _check(model, x, round_to=round_to)
    got = {n: m.out_channels for n, m in exported.named_modules() if isinstance(m, nn.Conv2d)}
    got.update((n, m.mask.num_channels) for n, m in exported.named_modules() if isinstance(m, FixedGate))
    assert got and all(w % round_to == 0 or w == widths[n] for n, w in got.items()), (got, widths)
    assert round_to > 2 or any(w < widths[n] for n, w in got.items())  # channels did go


@pytest.mark.parametrize("name", ["bn_batch_stats", "bn_affine_false"])
def test_fold_bn_of_batchnorm_variants(name, x, tmp_path):
    """fold_bn folds affine=False BatchNorm and leaves one without running stats (it normalises with
    batch statistics in eval) in place; it raised TypeError on running_var None."""
    model = _gated(name, 0, "random")
    exported = _check(model, x, tmp_path, fold_bn=True)
    assert any(isinstance(m, nn.BatchNorm2d) for m in exported.modules()) == (name == "bn_batch_stats")


@pytest.mark.parametrize("mode", ["random", "all_off"])
def test_constant_into_padded_conv_keeps_the_channel(mode, x, tmp_path):
    """A norm behind the gate turns a dead channel into its shift, which a padded conv reads as a
    constant inside and 0 in the pad: no bias reproduces it, so the channel stays (the export raised)."""
    model = _gated("gate_instancenorm_conv", 0, mode)
    exported = _check(model, x, tmp_path)
    assert exported[3][3].in_channels == 8


def test_gate_along_the_length_of_a_conv1d_output_is_named(x):
    """A gate on dim 2 of an (N, C, L) conv output gates positions, not channels: the export crashed
    with an IndexError; it now names the gate and the conv."""
    model = Conv1dNet()
    model.a2 = Gated(nn.ReLU(), ChannelGate(64, dim=2, threshold=0.0, init=0.0))
    with torch.no_grad():
        model.a2.gate.scores[::2] = -1.0
    with pytest.raises(ExportError, match=r"gate 'a2' scales dim 2 .* 'c2' \(Conv1d\)"):
        export_subnetwork(model.eval(), example_input=x)


@pytest.mark.parametrize("residual", [False, True])
def test_conv1d_model_gates_channels(residual, x, tmp_path):
    """insert_gates read an (N, C, L) Conv1d output as (N, L, C) and gated its 64 positions; an
    activation fed by a conv or a BatchNorm, or by an add of their outputs, has its channels on dim 1."""
    torch.manual_seed(0)
    model = Conv1dNet(residual)
    gates = insert_gates(model, example_input=x[:2])
    assert {n: (g.num_channels, g.dim) for n, g in gates.items()} == {"a1": (8, 1), "a2": (8, 1)}
    for g in gates.values():
        g.scores.data[::2] = -1.0
    exported = _check(model.eval(), x, tmp_path)
    assert exported.c1.out_channels == exported.c2.out_channels == 4


@pytest.mark.parametrize("arch", [Inception1d, Functional1d])
def test_cat_or_functional_activation_of_conv1d_outputs_gates_channels(arch, x, tmp_path):
    """An activation reading a torch.cat of (N, C, L) conv outputs, or an add of F.silu / F.gelu of them,
    was gated on its 64 positions (and its export refused): those are channel-first maps too."""
    torch.manual_seed(0)
    model = arch()
    gates = insert_gates(model, example_input=x[:2])
    assert {n: (g.num_channels, g.dim) for n, g in gates.items()} == {"act": (8, 1), "act2": (8, 1)}
    gates["act"].scores.data[::2] = -1.0
    exported = _check(model.eval(), x, tmp_path)
    if arch is Inception1d:  # Functional1d's channels stay: its residual stream has an ungated source (F.gelu)
        assert exported.c.in_channels == 4


def test_channels_last_block_gates_channels(x, tmp_path):
    """A 4-d output was always read as (N, C, H, W): the GELU of a ConvNeXt block, (N, H, W, 16) after
    its Linear, was gated on its 8 rows, and its export failed ('mat1 and mat2 shapes cannot be
    multiplied'); fed by a Linear or a LayerNorm, a 4-d output has its channels on dim 3."""
    torch.manual_seed(0)
    model = _convs(nn.Sequential(ConvNeXtBlock(), nn.ReLU()))
    gates = insert_gates(model, example_input=x[:2])
    assert {n: (g.num_channels, g.dim) for n, g in gates.items()} == {"3.0.act": (16, 3), "3.1": (8, 1)}
    gates["3.0.act"].scores.data[::2] = -1.0
    exported = _check(model.eval(), x, tmp_path)
    assert exported[3][0].p1.out_features == exported[3][0].p2.in_features == 8


@pytest.mark.parametrize("dead", [[0, 1, 2], list(range(8))])
def test_uncaught_channel_coupling_names_the_gate(dead, x):
    """A channel shuffle couples channels Torch-Pruning does not see: the pruned model's own forward
    raised ('shape [16, 2, 2, 8, 8] is invalid') or gave other outputs; each gate's removal is now
    checked, and the ExportError names the gate."""
    torch.manual_seed(0)
    model = Shuffle()
    gates = insert_gates(model, example_input=x[:2])
    gates["a1"].scores.data[dead] = -1.0
    with pytest.raises(ExportError, match="removing the dead channels of gate 'a1' .*the usual cause .*channel "
                                          "shuffle.*exclude that gate"):
        export_subnetwork(model.eval(), example_input=x)


def test_train_mode_channels_last_and_tracing(x):
    """A model in train mode exports its eval function (BN running stats) and stays as it was; a
    channels_last input exports the same; the result goes through torch.export and is uniformly
    trainable (pruned parameters were new Parameters with requires_grad=True, the others False)."""
    model = _gated("resnet", 1, "random").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exported = _check(model, x.contiguous(memory_format=torch.channels_last))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert {p.requires_grad for p in exported.parameters()} == {True}
    assert count_macs(exported, SHAPE) < count_macs(model, SHAPE)
    program = torch.export.export(exported, (x[:2],)).module()  # torch.jit.trace works too (deprecated in 2.13)
    assert torch.equal(program(x[:2]), exported(x[:2]))


def test_model_returning_a_tuple_is_named(x):
    """A forward returning (logits, features) failed with "'tuple' object has no attribute 'shape'"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.Linear(16, 5))
    insert_gates(model, example_input=x[:2])
    model.register_forward_hook(lambda _m, _inp, out: (out, out))
    with pytest.raises(ValueError, match="the model must return one tensor .*, got tuple"):
        export_subnetwork(model.eval(), example_input=x)


class Encoder(nn.Module):
    """Two nn.TransformerEncoderLayers (GELU module: gated) over 8 tokens of 24 features."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(24, 16), nn.Linear(16, 5)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, activation=nn.GELU(), batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)

    def forward(self, x):
        return self.head(self.enc(self.embed(x.reshape(len(x), 8, 24))).mean(1))


@pytest.mark.parametrize("round_to", [None, 8, 64])
def test_transformer_encoder_gates_stay_in_the_reference_and_the_export(round_to, x, tmp_path):
    """The fused inference path of nn.TransformerEncoderLayer runs its activation itself: freeze_gates'
    FixedGate lacked the hook that keeps a gated layer on the modular path, so the reference ignored the
    gates (0.28 from the gated model) and the export of dead FFN units was refused; a FixedGate kept in
    the export (round_to) or rebuilt by load_exported was bypassed the same way, silently (round_to=64
    keeps every unit: the export returned without error, 0.077 away from the gated model)."""
    torch.manual_seed(0)
    model = Encoder()
    gates = insert_gates(model, example_input=x[:2])
    for g in gates.values():
        g.scores.data.copy_(torch.rand(32, generator=torch.Generator().manual_seed(3)) - 0.6)
    model.eval()
    exported = _check(model, x, tmp_path, round_to=round_to)
    with torch.no_grad():
        assert float((exported(x) - model(x)).abs().max()) <= 1e-5
    assert (exported.enc.layers[0].linear1.out_features < 32) == (round_to != 64)


@pytest.mark.parametrize("conv", [lambda: nn.Conv1d(8, 8, 3),
                                  lambda: nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")])
def test_constant_folds_into_conv1d_and_reflect_padded_conv(conv, x):
    """A gate before BN leaves a constant; a Conv1d, or a conv whose padding repeats the constant, adds
    a per-channel bias for it: the channel goes (it stayed: only zero-padded Conv2d was mapped)."""
    torch.manual_seed(0)
    one_d = isinstance(conv(), nn.Conv1d)
    model = nn.Sequential(nn.Flatten(2) if one_d else nn.Identity(),
                          (nn.Conv1d if one_d else nn.Conv2d)(3, 8, 3, padding=1), nn.ReLU(),
                          (nn.BatchNorm1d if one_d else nn.BatchNorm2d)(8), conv(), nn.ReLU(),
                          nn.Flatten(2), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 5))
    gates = insert_gates(model, names=["2"], example_input=x[:2])
    with torch.no_grad():
        model[3].bias.uniform_(0.2, 0.5)
        gates["2"].scores[:3] = -1.0
    exported = _check(model.eval(), x)
    assert exported[4].in_channels == 5


class _RootScale(nn.Module):
    """A learnable channel scale held by the model itself, not by a submodule."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                                      nn.ReLU())
        self.scale = nn.Parameter(torch.rand(1, 16, 1, 1) + 0.5)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc((self.scale * self.features(x)).mean((2, 3)))


def test_a_parameter_of_the_root_module_shrinks_and_loads_back(tmp_path):
    """load_exported resized every described submodule but not the root: its pruned `scale` did not load."""
    torch.manual_seed(0)
    model, x = _RootScale().eval(), torch.rand(8, 3, 8, 8)
    gates = insert_gates(model, example_input=x)
    with torch.no_grad():
        gates["features.3"].scores[:10] = -1.0
    small = export_subnetwork(model, example_input=x)
    assert tuple(small.scale.shape) == (1, 6, 1, 1)
    save_exported(small, str(tmp_path / "sub.pt"))
    loaded = load_exported(str(tmp_path / "sub.pt"), model=_RootScale())
    probe = torch.rand(4, 3, 8, 8)
    assert torch.equal(loaded(probe), small(probe))


class _Chunked(nn.Module):
    """A CSP / C2f block (YOLO-style): the gated channels split in two by torch.chunk."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.cv1 = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU())
        self.m = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.cv2 = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU())
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        a, b = self.cv1(self.stem(x)).chunk(2, 1)
        return self.fc(self.cv2(torch.cat([a, self.m(b)], 1)).mean((2, 3)))


def test_channels_split_by_torch_chunk_stay_and_the_export_is_exact():
    """Torch-Pruning maps the second chunk's channels past the next layer's width: an IndexError came out of
    the export; those channels stay now (zeroed by their fixed gate), the others go, and the output is equal."""
    torch.manual_seed(0)
    model, x = _Chunked().eval(), torch.rand(8, 3, 8, 8)
    gates = insert_gates(model, example_input=x)
    with torch.no_grad():
        gates["cv1.1"].scores[[1, 2, 9, 10, 11]] = -1.0
        gates["cv2.1"].scores[:6] = -1.0
    small = export_subnetwork(model, example_input=x)
    assert max_abs_diff(freeze_gates(model), small, torch.rand(4, 3, 8, 8)) <= 1e-5
    assert small.cv1[0].out_channels == 16 and small.cv2[0].out_channels == 10


def _inverted_residual():
    """MobileNetV2's block: expand 1x1 -> BN -> ReLU6, depthwise 3x3 -> BN -> ReLU6, project 1x1 -> BN."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
                      nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
                      nn.Conv2d(32, 8, 1, bias=False), nn.BatchNorm2d(8)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_expand_channels_behind_dead_depthwise_channels_go():
    """A depthwise conv computes channel c from channel c alone: where the gate after it is off, the expand
    channel before it is dead too. A channel went only when every coupled gate was off, so 24 dead depthwise
    channels left the block at its full width 32 (MobileNetV2, EfficientNet)."""
    torch.manual_seed(0)
    model, x = _inverted_residual(), torch.rand(16, 3, 8, 8)
    gates = insert_gates(model, example_input=x)
    assert list(gates) == ["3.2", "3.5"]  # the stem's ReLU6 is left out
    with torch.no_grad():
        gates["3.5"].scores[:24] = -1.0  # the depthwise gate; the expand gate "3.2" keeps every channel
    small = export_subnetwork(model, example_input=x)
    assert small[3][0].out_channels == 8 and small[3][3].in_channels == small[3][3].out_channels == 8
    assert max_abs_diff(freeze_gates(model), small, torch.rand(8, 3, 8, 8)) <= 1e-6
    with torch.no_grad():  # the reverse (expand gate off, depthwise gate on) stays exact
        gates["3.5"].scores.fill_(1.0)
        gates["3.2"].scores[:24] = -1.0
    small = export_subnetwork(model, example_input=x)
    assert max_abs_diff(freeze_gates(model), small, torch.rand(8, 3, 8, 8)) <= 1e-6
