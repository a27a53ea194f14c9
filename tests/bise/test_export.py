"""Export: the physically pruned module equals the masked model (<= 1e-5, fp32, eval) and reloads."""

import json

import pytest
import torch
from torch import nn

from bise.export import (ExportError, FixedGate, arch_path, export_subnetwork, freeze_gates, load_exported,
                         max_abs_diff, save_exported)
from bise.flops import count_params
from bise.gates import Gated, gates_of, insert_gates
from bise.models import build_model, model_spec
from bise.models.mobilenetv2 import InvertedResidual

SHAPE = (3, 8, 8)


def _randomise(model: nn.Module, seed: int, density: float = 0.5) -> None:
    """Non-trivial BN statistics (so a dead-input BN outputs a non-zero constant) and random gate scores."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.3, 0.6, generator=gen)
        for g in gates_of(model).values():
            g.scores.copy_(torch.rand(g.num_channels, generator=gen) - (1 - density))


def _gated(arch: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(arch, 10, SHAPE, **kwargs)
    insert_gates(model)
    _randomise(model, seed)
    return model.eval()


class UserNet(nn.Module):
    """A user model: GELU / SiLU convs, a residual add, flatten into a Linear, a Linear layer with bias."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.act2 = nn.SiLU()
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(12 * 16, 20)
        self.act3 = nn.ReLU()
        self.fc2 = nn.Linear(20, 10)

    def forward(self, x):
        h = self.act1(self.conv1(x))
        h = self.act2(self.bn2(self.conv2(h)) + h)
        return self.fc2(self.act3(self.fc1(torch.flatten(self.pool(h), 1))))


def _user(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = UserNet()
    insert_gates(model, example_input=torch.rand(2, *SHAPE))
    _randomise(model, seed)
    return model.eval()


def _check(model, x, **kwargs):
    exported = export_subnetwork(model, example_input=x, **kwargs)
    diff = max_abs_diff(freeze_gates(model), exported, x)
    assert diff <= 1e-5, diff
    assert not any(isinstance(m, Gated) for m in exported.modules())
    return exported, diff



@pytest.fixture(scope="module")
def x():
    return torch.rand(32, *SHAPE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch,kwargs", [("mlp", {}), ("simple-cnn", {"width": 0.5}),
                                         ("resnet18", {"width": 0.25, "stem": "cifar"})])
@pytest.mark.parametrize("seed", [0, 1])
def test_builtin_random_masks_exact_and_smaller(arch, kwargs, seed, x):
    model = _gated(arch, seed, **kwargs)
    exported, _ = _check(model, x)
    assert count_params(exported) < count_params(model)


@pytest.mark.parametrize("arch,kwargs", [("resnet18", {"stem": "cifar"}), ("mobilenetv2", {"width": 0.25})])
def test_full_resnet18_and_depthwise(arch, kwargs, x):
    model = _gated(arch, 8, **kwargs)
    exported, _ = _check(model, x)
    assert count_params(exported) < count_params(model)


def test_dead_layer_and_dead_mid_block(x):
    cnn = _gated("simple-cnn", 2, width=0.5)
    gates_of(cnn)["features.relu2"].scores.data.fill_(-1.0)  # an entire layer off
    exported, _ = _check(cnn, x)
    assert exported.features.conv2.out_channels == 1  # one zeroed channel keeps the conv valid
    mlp = _gated("mlp", 2)
    gates_of(mlp)["features.relu3"].scores.data.fill_(-1.0)
    _check(mlp, x)
    res = _gated("resnet18", 3, width=0.25, stem="cifar")
    gates = gates_of(res)
    gates["layer1.0.relu1"].scores.data.fill_(-1.0)  # every mid-block gate off: conv2 outputs its BN shift
    gates["layer3.1.relu1"].scores.data.fill_(-1.0)
    exported, _ = _check(res, x)
    assert exported.layer1[0].conv1.out_channels == 1


def test_residual_coupling_keeps_union(x):
    res = _gated("resnet18", 4, width=0.25, stem="cifar")
    gates = gates_of(res)
    off_everywhere = torch.zeros(32, dtype=torch.bool)
    off_everywhere[:10] = True
    for name in ("layer2.0.relu2", "layer2.1.relu2"):
        scores = torch.rand(32) + 0.1
        scores[off_everywhere] = -1.0
        gates[name].scores.data.copy_(scores)
    gates["layer2.1.relu2"].scores.data[10:14] = -1.0  # off at one block output only: kept, scaled to 0
    exported, _ = _check(res, x)
    assert exported.layer2[0].conv2.out_channels == 22
    assert exported.layer3[0].conv1.in_channels == 22
    assert isinstance(exported.layer2[1].relu2, FixedGate)
    assert int((exported.layer2[1].relu2.mask.scale == 0).sum()) == 4


class _InvertedResidualNet(nn.Module):
    """A stem, one MobileNetV2 inverted-residual block (expand 1x1 -> depthwise 3x3 -> project) and a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.block = InvertedResidual(8, 8, 1, 4)  # 32 hidden channels, residual add
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("fold_bn", [False, True])
def test_an_expand_channel_off_takes_its_depthwise_channel(x, fold_bn):
    """An expand channel gated off left its depthwise channel (which then outputs act(BN shift), a constant
    the project conv's bias can stand for) and so itself in the export; a depthwise channel off takes its
    expand channel too. The export computes the masked model."""
    torch.manual_seed(0)
    net = _InvertedResidualNet()
    insert_gates(net, names=["block.conv.0.2", "block.conv.1.2"], example_input=x[:2])
    _randomise(net, 7)
    expand, depthwise = torch.ones(32, dtype=torch.bool), torch.ones(32, dtype=torch.bool)
    expand[:10] = False  # expand off, depthwise on
    depthwise[8:15] = False  # 8, 9: both off; 10..14: depthwise off, expand on
    masks = {"block.conv.0.2": expand, "block.conv.1.2": depthwise}
    exported = export_subnetwork(net.eval(), masks, example_input=x, fold_bn=fold_bn)
    assert max_abs_diff(freeze_gates(net, masks), exported, x) <= 1e-5
    kept = int((expand & depthwise).sum())  # 17
    assert exported.block.conv[0][0].out_channels == exported.block.conv[1][0].out_channels == kept
    assert exported.block.conv[2].in_channels == kept
    assert not any(isinstance(m, FixedGate) for m in exported.modules())  # no zeroed channel left


def test_mobilenetv2_keeps_only_the_channels_both_gates_keep(x):
    model = _gated("mobilenetv2", 9, width=0.25)
    exported, _ = _check(model, x)
    gates, blocks = gates_of(model), 0
    for i, block in enumerate(exported.features):
        if isinstance(block, InvertedResidual) and len(block.conv) == 4:  # an expand conv
            both = gates[f"features.{i}.conv.0.2"].mask() & gates[f"features.{i}.conv.1.2"].mask()
            assert block.conv[1][0].out_channels == max(1, int(both.sum())), i
            blocks += 1
    assert blocks == 16


def test_user_model_exact(x):
    model = _user(0)
    exported, _ = _check(model, x)
    assert count_params(exported) < count_params(model)


def test_fold_bn_and_round_to(x):
    res = _gated("resnet18", 5, width=0.25, stem="cifar")
    exported, _ = _check(res, x, fold_bn=True, round_to=8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in exported.modules())
    convs = [m for n, m in exported.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"]
    assert all(c.out_channels % 8 == 0 for c in convs)


def test_round_to_above_a_layers_width_keeps_it_whole(x):
    """A layer narrower than round_to cannot reach a multiple of it: it keeps its full width, gates and all."""
    res = _gated("resnet18", 5, width=0.25, stem="cifar")
    exported, _ = _check(res, x, round_to=1024)
    original = dict(res.named_modules())
    for name, m in exported.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels == original[name].out_channels, name


def test_constant_folding_gate_before_bn(x):
    """Gate on a conv output (before BN): a dead channel outputs act(BN shift), folded into fc1's bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 36, 10), nn.ReLU(), nn.Linear(10, 4))
    insert_gates(model, names=["1"], example_input=x[:2])
    _randomise(model, 6)
    model.eval()
    exported, _ = _check(model, x)
    assert exported[1].out_channels < 8 and exported[5].in_features < 8 * 36


def test_constant_into_padded_conv_keeps_the_channel(x):
    """No bias reproduces a constant that a padded conv reads (0 in the pad): the channel stays, exact."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1),
                          nn.Flatten(), nn.Linear(4 * 64, 3))
    insert_gates(model, names=["0"], example_input=x[:2])
    with torch.no_grad():
        model[1].bias.fill_(1.0)  # a dead channel outputs relu(1) = 1 into the padded conv "3"
        gates_of(model)["0"].scores[:2] = -1.0
    exported, _ = _check(model.eval(), x)
    assert exported[3].in_channels == 6


def test_save_load_builtin_and_custom(tmp_path, x):
    cnn = _gated("simple-cnn", 7, width=0.5)
    exported = export_subnetwork(cnn, example_input=x, fold_bn=True)
    path = str(tmp_path / "subnetwork.pt")
    save_exported(exported, path, model_spec(cnn))
    desc = json.load(open(arch_path(path)))
    assert desc["modules"]["features.conv2"]["out_channels"] == exported.features.conv2.out_channels
    loaded = load_exported(path)
    assert max_abs_diff(exported, loaded, x) == 0.0
    user = _user(1)
    exported = export_subnetwork(user, example_input=x)
    save_exported(exported, path, None)
    with pytest.raises(ExportError, match="custom architecture"):
        load_exported(path)
    assert max_abs_diff(exported, load_exported(path, model=UserNet()), x) == 0.0
    # a path ending in .json is where the description goes: the weights overwrote it (unreadable after)
    with pytest.raises(ValueError, match="ends in .json, where its description goes"):
        save_exported(exported, str(tmp_path / "m.json"), None)
    assert not (tmp_path / "m.json").exists()


def test_a_gate_on_the_model_input_is_named_as_such():
    """A gate whose channels no weighted layer makes (on the model's input) was reported as "did not run
    in the traced forward pass", which it did."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(4, 3, 2, 2)
    insert_gates(net, ["0"], example_input=x)
    with torch.no_grad():
        gates_of(net)["0"].scores.copy_(torch.where(torch.arange(12) % 2 == 0, 1.0, -1.0))
    with pytest.raises(ExportError, match="gate '0' gates channels that no layer with weights makes"):
        export_subnetwork(net, example_input=x)


def test_bad_input(tmp_path, x):
    with pytest.raises(ExportError, match="no gated module"):
        export_subnetwork(build_model("mlp", 10, SHAPE), example_input=x)
    for kwargs, match in (({"fold_bn": "no"}, "fold_bn must be True or False, got 'no'"),
                          ({"check": 0}, "check must be True or False, got 0")):
        with pytest.raises(ValueError, match=match):
            export_subnetwork(_gated("mlp", 1), example_input=x, **kwargs)
    with pytest.raises(ValueError, match="round_to"):
        export_subnetwork(_gated("mlp"), example_input=x, round_to=0)
    with pytest.raises(ExportError, match="not gated modules"):
        export_subnetwork(_gated("mlp"), {"nope": torch.ones(3, dtype=torch.bool)}, example_input=x)
    ln = nn.Sequential(nn.Flatten(), nn.Linear(192, 16), nn.ReLU(), nn.LayerNorm(16), nn.Linear(16, 4))
    insert_gates(ln, names=["2"], example_input=x[:2])
    gates_of(ln)["2"].scores.data[:4] = -1.0
    kept = export_subnetwork(ln.eval(), example_input=x)  # LayerNorm mixes channels: they stay, zeroed
    assert kept[1].out_features == 16 and max_abs_diff(freeze_gates(ln), kept, x) <= 1e-5
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ExportError, match="cannot read|not a bise-export"):
        load_exported(str(tmp_path / "bad.pt"))


def test_example_input_the_model_cannot_take_is_named(x):
    """An example_input of the wrong shape (e.g. unbatched (C, H, W), or another image size) failed in the
    first layer with 'mat1 and mat2 shapes cannot be multiplied (18x243 and 192x100)'."""
    for model, bad in ((_gated("mlp"), x[0]), (_gated("mlp"), torch.rand(2, 3, 9, 9)), (_user(), x[0])):
        with pytest.raises(ValueError, match=r"the model does not accept example_input of shape \(.*\): "):
            export_subnetwork(model, example_input=bad)


def test_fold_bn_uses_the_batchnorms_eps(x):
    """The folded scale is gamma / sqrt(var + eps): with eps = 0.1 (running_var in [0.5, 2]) a fold that
    dropped eps is off by several percent; the folded export still equals the masked model."""
    cnn = _gated("simple-cnn", 3, width=0.5)
    bns = [m for m in cnn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        bn.eps = 0.1
    exported, _ = _check(cnn, x, fold_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in exported.modules())


def test_the_export_is_checked_after_folding(x, monkeypatch):
    """The final comparison with the masked model runs after the BatchNorm fold: a fold that breaks the
    function is an ExportError, not a silently wrong export."""
    import sys

    export_module = sys.modules["bise.export"]  # bise.export is also the package's export function
    real = export_module._fold_batchnorm

    def corrupting(model, dg):
        folded = real(model, dg)
        conv = model.get_submodule(folded[0].replace("bn", "conv"))
        with torch.no_grad():
            conv.bias.add_(1.0)
        return folded

    monkeypatch.setattr(export_module, "_fold_batchnorm", corrupting)
    with pytest.raises(ExportError, match="the exported model changes the output by"):
        export_subnetwork(_gated("simple-cnn", 3, width=0.5), example_input=x, fold_bn=True)


def test_max_abs_diff_restores_both_modules_modes(x):
    """Both modules run in eval mode (dropout off: a module equals itself) and get their modes back."""
    torch.manual_seed(0)
    a = nn.Sequential(nn.Flatten(), nn.Linear(192, 4), nn.Dropout(0.5))
    b = nn.Sequential(nn.Flatten(), nn.Linear(192, 4), nn.Dropout(0.5))
    b.load_state_dict(a.state_dict())
    a.train(), b.eval()
    assert max_abs_diff(a, b, x, batch_size=10) == 0.0
    assert a.training and not b.training
    b.train()
    assert max_abs_diff(a, b, x) == 0.0
    assert a.training and b.training and all(m.training for m in (*a.modules(), *b.modules()))


# ---------------------------------------------------------------- mutation audit (auditM): gaps found


def test_a_mask_of_the_wrong_width_is_named(x):
    model = _gated("mlp", 0)
    name = next(iter(gates_of(model)))
    with pytest.raises(ExportError, match=rf"mask of '{name}' must be bool of shape \(\d+,\), got torch.bool \(3,\)"):
        export_subnetwork(model, {name: torch.ones(3, dtype=torch.bool)}, example_input=x)


def test_a_bias_free_conv_stays_bias_free_when_it_only_loses_zero_channels(x):
    """Removing channels that read 0 adds no bias: a bias-free conv (ResNet's) gained a zero bias parameter."""
    model = _gated("resnet18", 0, width=0.25, stem="cifar")
    exported, _ = _check(model, x)
    original = dict(model.named_modules())
    for name, m in exported.named_modules():
        if isinstance(m, nn.Conv2d) and original[name].bias is None:
            assert m.bias is None, name


class _ConvReadTwice(nn.Module):
    """conv's output feeds its BatchNorm and, unnormalised, a skip: BN may not be folded into conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8 * 64, 4)

    def forward(self, x):
        h = self.conv(x)
        return self.fc(torch.flatten(self.act(self.bn(h)) + h, 1))


def test_fold_bn_leaves_a_batchnorm_whose_conv_has_another_reader(x):
    torch.manual_seed(0)
    model = _ConvReadTwice()
    insert_gates(model, example_input=x[:2])
    _randomise(model, 3)
    exported, _ = _check(model.eval(), x, fold_bn=True, check=False)
    assert any(isinstance(m, nn.BatchNorm2d) for m in exported.modules())


class _FlagsNegativeRows(nn.Module):
    def forward(self, t):
        return (t.flatten(1).min(dim=1).values < 0).float().view(-1, 1)


def test_max_abs_diff_covers_every_batch(x):
    """The worst difference over all batches, not the last batch's: here only the first sample differs."""
    inputs = x[:5].clone()
    inputs[0] = -1.0
    zero = nn.Sequential(nn.Flatten(), nn.Linear(192, 1))
    with torch.no_grad():
        zero[1].weight.zero_(), zero[1].bias.zero_()
    assert max_abs_diff(zero, _FlagsNegativeRows(), inputs, batch_size=2) == 1.0
