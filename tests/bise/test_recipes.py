"""bise.recipes (a recipe per architecture, chosen with the data, never from a name) and
bise.health.check_vanilla (a vanilla that did not train is refused)."""

import dataclasses

import pytest
import torch

from bise.health import VanillaUntrained, check_vanilla
from bise.models import build_model
from bise.recipes import RECIPES, recipe_for
from bise.train import train_vanilla


def test_mlp_gets_adam_on_every_kind_of_data(digits):
    two_bias = dataclasses.replace(digits, num_biases=2, weighting="two-bias")
    for ds in (digits, two_bias, dataclasses.replace(digits, weighting="group-balanced")):
        r = recipe_for(ds, "mlp")
        assert (r["name"], r["optimizer"], r["lr"], r["weight_decay"], r["batch_size"]) == \
            ("mlp", "adam", 1e-3, 1e-4, 256)
    assert recipe_for(two_bias)["arch"] == "mlp"  # the paper's architecture for two-bias data


def test_simple_cnn_gets_its_paper_recipe_with_the_rho_schedule(digits):
    r = recipe_for(digits, "simple-cnn")
    assert (r["optimizer"], r["lr"], r["momentum"], r["batch_size"], r["epochs"]) == ("sgd", 0.1, 0.9, 100, 80)
    assert r["milestones"] == [40, 60]  # colored-digits defaults to rho = 0.99
    assert recipe_for(dataclasses.replace(digits, rho=0.997), "simple-cnn")["milestones"] == [80, 90]
    assert recipe_for(digits)["arch"] == "simple-cnn"


def test_resnet_recipe_follows_the_weighting_and_unknown_archs_get_the_default(digits):
    assert recipe_for(dataclasses.replace(digits, weighting="group-balanced"), "resnet18")["lr"] == 1e-4
    assert recipe_for(digits, "resnet18")["schedule"] == "cosine"
    assert recipe_for(digits, "mobilenetv2")["name"] == "default"
    assert recipe_for(digits, build_model("mlp", 10, (3, 8, 8)))["name"] == "mlp"  # a model: its recorded arch


def test_recipe_ignores_the_dataset_name(digits):
    for name in ("my-corrupted-data", "biased-mnist", "anything"):
        assert recipe_for(dataclasses.replace(digits, name=name), "mlp") == recipe_for(digits, "mlp")
        assert recipe_for(dataclasses.replace(digits, name=name)) == recipe_for(digits)


def test_recipes_are_copies(digits):
    recipe_for(digits, "mlp")["lr"] = 5.0
    assert RECIPES["mlp"]["lr"] == 1e-3


def test_a_trained_mlp_is_healthy(digits):
    model = train_vanilla(digits, "mlp", epochs=20, quiet=True)
    h = check_vanilla(model, digits)
    assert h.ok and h.train_accuracy > 0.9 and h.dead_unit_share < 0.5 and h.units == 300
    aligned = digits.train.aligned()
    assert h.n_conflicting_train == int((~aligned).sum()) > 0 and h.n_train == len(digits.train)
    assert 0 <= h.conflicting_train_accuracy <= 1


def test_a_dead_mlp_is_refused(digits):
    torch.manual_seed(0)
    model = build_model("mlp", 10, digits.input_shape)
    with torch.no_grad():  # what an SGD-0.1-killed MLP looks like: first-layer ReLUs never fire
        model.features.fc1.bias.fill_(-1e3)
    with pytest.raises(VanillaUntrained, match="did not train") as e:
        check_vanilla(model, digits)
    assert "never fire" in str(e.value) and "training accuracy" in str(e.value)
    with pytest.warns(UserWarning, match="did not train"):
        h = check_vanilla(model, digits, strict=False)
    assert not h.ok and h.dead_units >= 100 and h.to_dict()["ok"] is False


def test_health_thresholds_are_checked(digits):
    model = build_model("mlp", 10, digits.input_shape)
    with pytest.raises(ValueError, match="min_gap_closed"):
        check_vanilla(model, digits, min_gap_closed=2)
    with pytest.raises(ValueError, match="max_dead_share"):
        check_vanilla(model, digits, max_dead_share=0)


def test_dead_units_count_relu6_and_each_place_of_a_shared_relu(digits):
    """MobileNetV2's ReLU6 layers were not counted (its health said 0 units); a ReLU module called at two
    places was one layer whose places were OR-ed (and failed on places of different widths)."""
    from torch import nn

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.out = nn.Linear(192, 8), nn.Linear(8, 16), nn.Linear(16, 10)
            self.relu, self.relu6 = nn.ReLU(), nn.ReLU6()

        def forward(self, x):
            return self.out(self.relu6(self.relu(self.fc2(self.relu(self.fc1(x.flatten(1)))))))

    torch.manual_seed(0)
    model = Shared()
    with torch.no_grad():
        model.fc2.bias.fill_(-1e3)  # the second place of relu and relu6 never fire: 16 + 16 dead of 8 + 16 + 16
    h = check_vanilla(model, digits, strict=False)
    assert (h.units, h.dead_units, h.worst_layer_dead_share) == (40, 32, 1.0)
    mobilenet = build_model("mobilenetv2", 10, digits.input_shape, width=0.25)
    assert check_vanilla(mobilenet, digits, strict=False).units > 0


class _Answers(torch.nn.Module):
    """A stub classifier that answers the class written in each image's first pixel (no ReLU: no dead units)."""

    def forward(self, x):
        return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), 10).float()


def _answered(y, b, answers):
    """Training data of 10 classes whose samples make _Answers predict ``answers``."""
    from types import SimpleNamespace

    from bise.data.types import Split

    x = torch.zeros(len(y), 1, 1, 1, dtype=torch.uint8)
    x[:, 0, 0, 0] = answers.to(torch.uint8)
    return SimpleNamespace(train=Split(x, y, b), num_classes=10)


def test_training_accuracy_must_close_half_the_gap_from_chance():
    """10 classes: the floor is 0.1 + 0.5 * 0.9 = 0.55, so 40% training accuracy is refused (a floor of
    chance + 0.5 * chance, 0.15, let it through)."""
    y = torch.arange(100) % 10
    answers = torch.where(torch.arange(100) < 40, y, (y + 1) % 10)  # right on 40 of 100
    data = _answered(y, y.clone(), answers)
    with pytest.warns(UserWarning, match=r"training accuracy 0\.400 is below 0\.550"):
        h = check_vanilla(_Answers(), data, strict=False)
    assert h.chance == pytest.approx(0.1) and h.min_train_accuracy == pytest.approx(0.55)
    assert h.train_accuracy == pytest.approx(0.4) and h.dead_unit_share is None and not h.ok
    with pytest.raises(VanillaUntrained, match="did not learn its training set"):
        check_vanilla(_Answers(), data)
    assert check_vanilla(_Answers(), _answered(y, y.clone(), torch.where(torch.arange(100) < 56, y, (y + 1) % 10))).ok


def test_conflicting_and_aligned_training_accuracy_are_measured_on_their_own_samples():
    """A model right on every bias-aligned sample and wrong on every conflicting one: 1.0 and 0.0."""
    y = torch.arange(100) % 10
    b = torch.where(torch.arange(100) < 70, y, (y + 3) % 10)  # the last 30 conflict
    answers = torch.where(b == y, y, (y + 1) % 10)
    h = check_vanilla(_Answers(), _answered(y, b, answers))
    assert h.ok and h.train_accuracy == pytest.approx(0.7) and h.n_conflicting_train == 30
    assert h.aligned_train_accuracy == 1.0 and h.conflicting_train_accuracy == 0.0


def test_train_vanilla_seed_fixes_the_model_and_leaves_the_callers_rng(digits):
    """seed fixes the initialisation whatever the global RNG; the caller's RNG state is given back; eval mode."""
    torch.manual_seed(1)
    a = train_vanilla(digits, "mlp", epochs=0, seed=5, width=0.3, quiet=True)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = train_vanilla(digits, "mlp", epochs=0, seed=5, width=0.3, quiet=True)
    assert torch.equal(torch.get_rng_state(), state)  # not reseeded by the library call
    c = train_vanilla(digits, "mlp", epochs=0, seed=6, width=0.3, quiet=True)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    assert not a.training and not b.training  # eval mode on return, also with epochs=0


def test_default_architecture_and_recipe_of_each_kind_of_data(digits):
    from torch import nn

    balanced = dataclasses.replace(digits, weighting="group-balanced")
    assert recipe_for(balanced)["arch"] == "resnet18" and recipe_for(balanced)["name"] == "resnet18-group-balanced"
    assert recipe_for(dataclasses.replace(digits, rho=0.995), "simple-cnn")["milestones"] == [40, 60]
    custom = recipe_for(digits, nn.Linear(3, 10))  # a model bise did not build
    assert (custom["arch"], custom["name"], custom["epochs"]) == ("custom", "default", 30)
    assert recipe_for(digits, "mobilenetv2")["epochs"] == 30
    with pytest.raises(TypeError, match="arch must be"):
        recipe_for(digits, 18)


def test_train_vanilla_takes_the_recipe_unless_told(digits, monkeypatch):
    import bise.train as train

    seen = {}
    monkeypatch.setattr(train, "fit", lambda model, split, recipe, **kw: seen.update(kw, recipe=recipe) or model)
    train.train_vanilla(digits, "mlp", quiet=True)
    assert (seen["epochs"], seen["batch_size"], seen["lr"], seen["recipe"]["name"]) == (100, 256, 1e-3, "mlp")
    train.train_vanilla(digits, "mlp", epochs=3, batch_size=7, lr=0.5, seed=4, quiet=True)
    assert (seen["epochs"], seen["batch_size"], seen["lr"], seen["seed"]) == (3, 7, 0.5, 4)


def test_a_layer_exactly_at_max_dead_share_passes(digits):
    """Untrained means MORE than max_dead_share of a layer dead: a layer all dead passes max_dead_share=1."""
    torch.manual_seed(0)
    model = build_model("mlp", 10, digits.input_shape)
    with torch.no_grad():
        model.features.fc1.bias.fill_(-1e3)
    with pytest.warns(UserWarning, match="did not learn its training set"):  # accuracy alone
        h = check_vanilla(model, digits, strict=False, max_dead_share=1.0)
    assert h.worst_layer_dead_share == 1.0
    assert not any("never fire" in p for p in h.problems), h.problems


def test_dead_units_are_found_on_the_first_n_training_inputs_only():
    from bise.health import _dead_units

    seen = []

    class Spy:
        def __len__(self):
            return 10

        def inputs(self, idx):
            seen.extend(idx.tolist())
            return torch.rand(len(idx), 4)

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    assert len(_dead_units(model, Spy(), "cpu", 3)) == 1
    assert seen == [0, 1, 2]
