"""The bise Python API names bad arguments before any work and accepts the natural types."""

from pathlib import Path

import numpy as np
import pytest
import torch
from _userdata import write_npz

import bise
from bise import validate
from bise.data import load
from bise.extract import ExtractConfig
from bise.models import build_model


@pytest.fixture(scope="module")
def data():
    return load("colored-digits")


@pytest.mark.parametrize("kwargs, match", [
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"lr": 0}, "lr must be a positive finite number, got 0"),
    ({"lr": float("nan")}, "lr must be a positive finite number"),
    ({"epochs": -1}, "epochs must be an int >= 0"),
    ({"epochs": 1.5}, "epochs must be an int"),
    ({"epochs": True}, "epochs must be an int"),
    ({"batch_size": True}, "batch_size must be an int"),
    ({"lr": float("inf")}, "lr must be a positive finite number"),
    ({"seed": True}, "seed must be an int"),
    ({"device": "gpu"}, "device must be cpu, cuda or cuda:N, got 'gpu'"),
    ({"device": "meta"}, "bise trains on cpu or cuda only"),
    ({"device": "mps"}, "bise trains on cpu or cuda only"),
    ({"device": "cuda:7"}, "device 'cuda:7'"),
])
def test_train_vanilla_names_bad_arguments(data, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bise.train_vanilla(data, "mlp", **{"epochs": 1, **kwargs}, quiet=True)


def test_numpy_scalars_are_accepted(data):
    torch.manual_seed(0)
    a = bise.train_vanilla(data, "mlp", epochs=np.int64(1), batch_size=np.int32(200), lr=np.float32(0.05),
                           seed=np.int64(0), quiet=True)
    b = bise.train_vanilla(data, "mlp", epochs=1, batch_size=200, lr=float(np.float32(0.05)), seed=0, quiet=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    config = validate.extract_config({"mask_epochs": np.int64(3), "budget": np.float32(0.5)})
    assert type(config.mask_epochs) is int and config.mask_epochs == 3 and type(config.budget) is float


def test_config_types():
    assert validate.extract_config(None) == ExtractConfig()
    assert validate.extract_config({"mask_epochs": 2}).mask_epochs == 2
    with pytest.raises(ValueError, match=r"unknown keys \['mask_epoch'\]"):
        validate.extract_config({"mask_epoch": 2})
    with pytest.raises(TypeError, match="config must be an ExtractConfig, a dict of its fields or None, got list"):
        validate.extract_config([])
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        validate.extract_config({"device": "gpu"})
    with pytest.raises(ValueError, match="mask_epochs must be an int >= 1"):
        validate.extract_config(ExtractConfig(mask_epochs=0))


def test_extract_refuses_a_model_that_does_not_fit_the_data(data):
    few = build_model("mlp", 5, data.input_shape)
    with pytest.raises(ValueError, match="the model outputs 5 class logits, the data have num_classes=10"):
        bise.extract(few, data, config={"mask_epochs": 1, "head_epochs": 0}, quiet=True)
    big = build_model("simple-cnn", 10, (3, 28, 28))
    with pytest.raises(ValueError, match=r"built for \(3, 28, 28\) inputs, the data have \(3, 8, 8\)"):
        bise.extract(big, data, config={"mask_epochs": 1, "head_epochs": 0}, quiet=True)
    custom = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    with pytest.raises(ValueError, match="the model outputs 4 class logits"):
        validate.model_fits(custom, data)
    with pytest.raises(ValueError, match="does not accept the data's"):
        validate.model_fits(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(7, 10)), data)
    validate.model_fits(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10)), data)


def test_data_spec_may_be_a_path(tmp_path):
    write_npz(tmp_path / "mine.npz", train=30, test=10, hw=4)
    assert len(load(Path(tmp_path / "mine.npz")).train) == 30
    with pytest.raises(ValueError, match="spec=3"):
        load(3)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
    ({"epochs": -1}, "epochs must be an int >= 0"),
    ({"lr": 0.0}, "lr must be a positive finite number"),
])
def test_finetune_refuses_bad_numbers_instead_of_a_default(kwargs, message):
    data = load("colored-digits", seed=0)
    model = build_model("mlp", data.num_classes, data.input_shape)
    with pytest.raises(ValueError, match=message):
        bise.finetune(model, data, **kwargs)


@pytest.mark.parametrize("seed", [-1, 2 ** 63, True])
def test_every_entry_point_names_a_bad_seed(data, seed):
    """torch seeds are 64-bit: a larger one failed late with 'Overflow when unpacking long long'; the
    extraction and fine-tuning took any seed."""
    model = build_model("mlp", data.num_classes, data.input_shape)
    calls = [lambda: bise.train_vanilla(data, "mlp", epochs=0, seed=seed, quiet=True),
             lambda: validate.extract_config({"seed": seed}),
             lambda: bise.finetune(model, data, epochs=0, seed=seed),
             lambda: load("colored-digits", seed=seed)]
    for call in calls:
        with pytest.raises((ValueError, TypeError), match=r"seed must be an int >= 0 and <= 2\*\*63 - 1"):
            call()


@pytest.mark.parametrize("device, match", [("gpu", "device must be cpu, cuda or cuda:N, got 'gpu'"),
                                           ("cuda:99", "device 'cuda:99'")])
def test_evaluate_and_finetune_name_a_bad_device(data, device, match):
    """bise.evaluate, Subnetwork.evaluate and bise.finetune took any device: 'gpu' failed inside torch
    ('Expected one of cpu, cuda, ...') and 'cuda' without CUDA with 'Torch not compiled with CUDA enabled'."""
    model = build_model("mlp", data.num_classes, data.input_shape)
    sub = bise.extract(model, data, config={"mask_epochs": 1, "head_epochs": 0}, quiet=True)
    calls = [lambda: bise.evaluate(model, data.test, device=device),
             lambda: bise.evaluate(model, data, device=device),
             lambda: sub.evaluate(data.test, device=device),
             lambda: bise.finetune(model, data, epochs=1, device=device, quiet=True)]
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()
    assert bise.evaluate(model, data.test, device=torch.device("cpu")) == bise.evaluate(model, data.test)


@pytest.mark.parametrize("field, value, match", [
    ("alpha", float("nan"), "alpha must be a finite number >= 0, got nan"),
    ("gamma", float("inf"), "gamma must be a finite number >= 0, got inf"),
    ("alpha", -1.0, "alpha must be a finite number >= 0, got -1.0"),
    ("mask_weight_decay", float("nan"), "mask_weight_decay must be a finite number >= 0"),
    ("head_weight_decay", -1e-4, "head_weight_decay must be a finite number >= 0"),
    ("mask_momentum", -1.0, r"mask_momentum must be a number in \[0, 1\), got -1.0"),
    ("head_momentum", 2.0, r"head_momentum must be a number in \[0, 1\), got 2.0"),
    ("amp", "yes", "amp must be True or False, got 'yes'"),
    ("cache_features", "no", "cache_features must be True or False, got 'no'"),
    ("deterministic", None, "deterministic must be True or False, got None"),
    ("label_free", 1, "label_free must be True or False, got 1"),
    ("bottleneck", 3, "bottleneck must be a module name or None, got 3"),
    ("mask_lr", True, "mask_lr must be a positive number, got True"),
    ("cache_limit_mb", True, "cache_limit_mb must be a positive number, got True"),
    ("tau_factor", "0.5", r"tau_factor must be a number in \(0, 1\), got '0.5'"),
    ("tau_stop", 1e-40, "tau_stop=1e-40 takes the temperature to 9.18e-41, below float32's smallest normal number"),
    ("rho", 1.5, r"rho must be a number in \(0, 1\), or two of them \(two biases\), or None, got 1.5"),
    ("rho", [0.9], r"or None, got \[0.9\]"),
    ("rho", True, "or None, got True"),
])
def test_extract_config_names_every_bad_field_before_any_work(field, value, match):
    """These fields were taken as given: a NaN alpha or weight decay failed after head pre-training
    ('scores contains non-finite values'), a negative momentum inside torch without naming the field,
    momentum 2 and alpha -1 ran (diverging / maximising the loss), cache_features='no' ran as True,
    amp='yes' failed in torch.autocast, gate_names='features.fc1' matched its letters one by one."""
    with pytest.raises(ValueError, match=match):
        validate.extract_config({field: value})


@pytest.mark.parametrize("field, value, match", [
    ("gate_names", "features.fc1", r"gate_names must be a list of module-name patterns \(fnmatch\) or None, got "
                                   "'features.fc1'"),
    ("gate_exclude", [3], r"gate_exclude must be a list of module-name patterns \(fnmatch\) or None, got \[3\]"),
    ("gate_names", 3, r"gate_names must be a list of module-name patterns \(fnmatch\) or None, got 3"),
])
def test_pattern_lists_of_the_wrong_type_are_a_type_error(field, value, match):
    """ExtractConfig raised ValueError for what insert_gates refused with TypeError (two copies of one
    check): one check now (validate.patterns), TypeError for a wrong type as everywhere."""
    with pytest.raises(TypeError, match=match):
        validate.extract_config({field: value})


def test_gate_patterns_that_match_nothing_are_named_before_training(data, monkeypatch):
    """gate_exclude=["features.relu"] (a typo of features.relu1) excluded nothing and kept the layer gated,
    silently; a pre-gated model ignored gate_names / gate_exclude."""
    import sys

    from bise.gates import insert_gates

    monkeypatch.setattr(sys.modules["bise.extract"], "_labels", lambda *a: pytest.fail("the run started"))
    model = build_model("mlp", data.num_classes, data.input_shape)
    with pytest.raises(ValueError, match=r"gate_exclude pattern\(s\) \['features.relu'\] match no activation "
                                         r"module of MLP .*those are: features.relu1, features.relu2"):
        bise.extract(model, data, config={"mask_epochs": 1, "gate_exclude": ["features.relu1", "features.relu"]},
                     quiet=True)
    with pytest.raises(ValueError, match=r"gate_names pattern\(s\) \['features.rleu\*'\] match no module of MLP"):
        bise.extract(model, data, config={"mask_epochs": 1, "gate_names": ["features.rleu*"]}, quiet=True)
    insert_gates(model)
    with pytest.raises(ValueError, match="the model has gates already"):
        bise.extract(model, data, config={"mask_epochs": 1, "gate_exclude": ["features.relu1"]}, quiet=True)


@pytest.mark.parametrize("given", ["colored-digits", Path("mine.npz"), None, 3])
def test_entry_points_name_data_that_is_not_a_dataset(data, given):
    """train_vanilla and finetune failed with AttributeError ("'str' object has no attribute
    'num_classes'"), extract with "data.train is missing or empty", when given a spec instead of
    bise.load_data(spec)."""
    model = build_model("mlp", data.num_classes, data.input_shape)
    calls = [lambda: bise.train_vanilla(given, "mlp", epochs=0, quiet=True),
             lambda: bise.extract(model, given, config={"mask_epochs": 1}, quiet=True),
             lambda: bise.finetune(model, given, epochs=0, quiet=True)]
    hint = r"load it with bise.load_data\(" if isinstance(given, (str, Path)) else "a dataset from bise.load_data"
    for call in calls:
        with pytest.raises(TypeError, match=f"data must be .*{hint}"):
            call()


class _TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.out = torch.nn.Linear(192, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10)

    def forward(self, x):
        h = self.act(self.fc(x.flatten(1)))
        return self.out(h), h


def test_extract_names_a_model_it_cannot_run(data):
    """A float64 / bf16 model failed inside the first matmul ('mat1 and mat2 must have the same dtype'),
    a model returning (logits, features) with AttributeError ("'tuple' object has no attribute 'dim'")."""
    config = {"mask_epochs": 1, "head_epochs": 0}
    for dtype in (torch.float64, torch.bfloat16):
        model = build_model("mlp", data.num_classes, data.input_shape).to(dtype)
        with pytest.raises(ValueError, match=f"the model's parameters are {dtype}; bise feeds it float32 inputs"):
            bise.extract(model, data, config=config, quiet=True)
    with pytest.raises(ValueError, match="the model must return one tensor of class logits .N, 10., got tuple"):
        bise.extract(_TwoOutputs(), data, config=config, quiet=True)


def test_train_vanilla_refuses_a_model_for_arch(data):
    """recipe_for takes a model, so train_vanilla(data, model) passed its type check: a built-in model
    was silently ignored (a fresh one of its architecture was trained and returned, its width lost),
    a custom one failed with "arch must be one of (...), got 'custom'"."""
    for model in (build_model("mlp", data.num_classes, data.input_shape, width=0.5),
                  torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 10))):
        with pytest.raises(TypeError, match="arch must be an architecture name .* or None, got Sequential|got MLP"):
            bise.train_vanilla(data, model, epochs=0, quiet=True)


@pytest.mark.parametrize("bias, match", [
    (lambda n: torch.full((n,), 10), r"bias\[0\] = 10: out of range for num_bias_classes=10"),
    (lambda n: torch.full((n,), -1), r"bias\[0\] = -1: out of range for num_bias_classes=10"),
    (lambda n: torch.full((n,), 0.5), "bias must hold integer labels, got torch.float32"),
])
def test_finetune_names_bias_labels_out_of_range(data, bias, match):
    """Out-of-range bias labels failed in the first batch with 'IndexError: index 10 is out of bounds';
    float ones were truncated to integers."""
    model = build_model("mlp", data.num_classes, data.input_shape)
    with pytest.raises(ValueError, match=match):
        bise.finetune(model, data, epochs=1, bias=bias(len(data.train)), quiet=True)


def test_extract_names_a_bad_out_dir_or_callback_before_training(data, tmp_path, monkeypatch):
    """An out_dir that is a file failed with FileExistsError at the first checkpoint, a callback that is
    not callable with "'int' object is not callable" after the first epoch: both after head pre-training."""
    import sys

    extract_module = sys.modules["bise.extract"]

    def no_training(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(extract_module, "prepare_run", no_training)
    model = build_model("mlp", data.num_classes, data.input_shape)
    config = {"mask_epochs": 1, "head_epochs": 1}
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"out_dir .*file' is a file, not a folder"):
        bise.extract(model, data, config=config, out_dir=tmp_path / "file", quiet=True)
    with pytest.raises(TypeError, match="callback must be a function of .epoch, record. or None, got int"):
        bise.extract(model, data, config=config, callback=3, quiet=True)


def test_a_subnetwork_given_for_a_model_is_named(data):
    """bise.evaluate(sub, ...) failed with "'Subnetwork' object has no attribute 'training'",
    bise.finetune(sub, ...) with 'arch must be an architecture name, a model or None, got Subnetwork'."""
    model = build_model("mlp", data.num_classes, data.input_shape)
    sub = bise.extract(model, data, config={"mask_epochs": 1, "head_epochs": 0}, quiet=True)
    calls = [lambda: bise.evaluate(sub, data.test), lambda: bise.evaluate(sub, data),
             lambda: bise.finetune(sub, data, epochs=0, quiet=True),
             lambda: bise.extract(sub, data, config={"mask_epochs": 1}, quiet=True)]
    for call in calls:
        with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got Subnetwork; its model is sub.model"):
            call()


def test_a_torch_device_in_the_config_is_kept_as_its_name():
    """ExtractConfig(device=torch.device("cpu")) ran but left a torch.device in sub.config, so the
    config was no longer JSON-serialisable ('Object of type device is not JSON serializable')."""
    import dataclasses
    import json

    config = validate.extract_config(ExtractConfig(device=torch.device("cpu")))
    assert config.device == "cpu" and json.loads(json.dumps(dataclasses.asdict(config)))["device"] == "cpu"


def test_numpy_numbers_everywhere_numbers_go(data):
    """docs/cli.md: NumPy integers and floats are accepted wherever numbers go. bise.evaluate refused
    batch_size=np.int64(64) ('must be a positive int'), build_model num_classes=np.int64(10) and
    width=np.float32(0.5), bise.train.fit (the path for a model of one's own) np.int64 epochs."""
    from bise.recipes import recipe_for
    from bise.train import fit

    model = build_model("mlp", np.int64(data.num_classes), data.input_shape, width=np.float32(0.5))
    assert model.bise_spec["num_classes"] == 10 and type(model.bise_spec["width"]) is float
    assert bise.evaluate(model, data.test, batch_size=np.int64(64)) == bise.evaluate(model, data.test)
    fit(model, data.train, recipe_for(data, model), epochs=np.int64(0), batch_size=np.int32(64),
        lr=np.float32(0.1), quiet=True)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        bise.evaluate(model, data.test, batch_size=0)
    with pytest.raises(TypeError, match="num_classes must be an int >= 2, got 2.0"):
        build_model("mlp", 2.0, data.input_shape)


@pytest.mark.parametrize("kwargs, name", [({"cache_dir": 3}, "cache_dir"), ({"data_dir": ["a"]}, "data_dir")])
def test_load_data_names_a_folder_that_is_not_a_path(kwargs, name):
    """cache_dir=3 failed with 'expected str, bytes or os.PathLike object, not int', naming no argument."""
    with pytest.raises(TypeError, match=f"{name} must be a path .str or os.PathLike. or None, got"):
        bise.load_data("colored-digits", **kwargs)


def test_rho_and_weighting_that_would_be_ignored_are_named(data):
    """label_free=True overrode an explicit weighting, and a rho beside a weighting that counts the groups
    (group-balanced, empirical-joint) was recorded as used: both ran without a word."""
    with pytest.raises(ValueError, match="label_free=True weights by the empirical joint .* weighting='two-bias' "
                                         "would be ignored"):
        validate.extract_config({"label_free": True, "weighting": "two-bias"})
    model = build_model("mlp", data.num_classes, data.input_shape)
    with pytest.raises(ValueError, match="rho=0.9 would be ignored: weighting 'group-balanced' counts the groups"):
        bise.extract(model, data, config={"mask_epochs": 1, "head_epochs": 0, "weighting": "group-balanced",
                                          "rho": 0.9}, quiet=True)


@pytest.mark.parametrize("settings, message", [
    ({"mi": False, "gamma": 100.0}, "mi=False drops the mutual-information term; gamma=100.0 would be ignored"),
    ({"identification_epochs": 50}, "label_free=False trains no identification model; identification_epochs=50 "
                                    "would be ignored"),
])
def test_settings_their_switch_turns_off_are_named(settings, message):
    """gamma without the MI term, identification_epochs without label_free: accepted and unused (the masks
    came out bit-identical), as a weighting beside label_free=True was before."""
    with pytest.raises(ValueError, match=message):
        validate.extract_config(settings)
    validate.extract_config({**settings, "mi": True, "label_free": True})  # switched on: used


def test_device_index_is_checked_against_the_cuda_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert validate.device("cuda:1") == torch.device("cuda", 1)
    assert validate.device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        validate.device("cuda:2")


def test_extract_config_leaves_the_callers_config_alone():
    """An ExtractConfig given is copied before its numbers and device are normalised."""
    given = ExtractConfig(mask_epochs=np.int64(3), device=torch.device("cpu"))
    config = validate.extract_config(given)
    assert config is not given and config.mask_epochs == 3 and type(config.mask_epochs) is int
    assert type(given.mask_epochs) is np.int64 and given.device == torch.device("cpu")


def test_model_fits_runs_a_custom_model_once_and_gives_its_mode_back(data):
    """A model without bise_spec is checked by one forward in eval mode; its train mode is restored;
    only (N, num_classes) logits fit."""
    import math

    from torch import nn

    flat = math.prod(data.input_shape)
    model = nn.Sequential(nn.Flatten(), nn.Linear(flat, data.num_classes)).train()
    validate.model_fits(model, data)
    assert model.training
    three_d = nn.Sequential(nn.Flatten(), nn.Linear(flat, 2 * data.num_classes), nn.Unflatten(1, (2, data.num_classes)))
    with pytest.raises(ValueError, match="the model outputs None class logits"):
        validate.model_fits(three_d, data)


def test_bias_label_checks_of_validate(data):
    """same_bias_classes: training bias labels needed unless label-free; two_bias_rho: a rho given serves
    where the data have none."""
    import dataclasses

    from bise.data.types import Split

    no_bias = dataclasses.replace(data, train=Split(data.train.x, data.train.y, None))
    with pytest.raises(ValueError, match="bias labels are missing from the train split.* use --label-free"):
        validate.same_bias_classes(no_bias, False, "--label-free")
    validate.same_bias_classes(no_bias, True)
    two_bias = dataclasses.replace(data, num_biases=2, weighting="two-bias", rho=None)
    validate.two_bias_rho(two_bias, "two-bias", rho=(0.9, 0.8))
    with pytest.raises(ValueError, match=r"weighting 'two-bias' needs rho=\(rho_left, rho_right\)"):
        validate.two_bias_rho(two_bias, "two-bias")
