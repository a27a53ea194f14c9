"""BISE extraction on tiny data: schedule, selection, caching equivalence, checkpoints, bad input."""

import dataclasses
import sys

import pytest
import torch

from bise.checkpoint import CheckpointError
from bise.data.types import BiasedDataset, Split
from bise.evaluate import predict
from bise.extract import CHECKPOINT_NAME, ExtractConfig, extract
from bise.gates import gates_of, insert_gates
from bise.models import build_model
from bise.subnetwork import Subnetwork
from bise.train import train_vanilla

TINY = dict(mask_epochs=3, head_epochs=2, batch_size=50)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Single-threaded: deterministic and far faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_data(n=120, classes=3, two_bias=False, seed=0, val=True):
    g = torch.Generator().manual_seed(seed)

    def split(m):
        y = torch.randint(0, classes, (m,), generator=g)
        b = y.clone()
        flip = torch.rand(m, generator=g) < 0.2
        b[flip] = torch.randint(0, classes, (int(flip.sum()),), generator=g)
        if two_bias:
            b = torch.stack([b, torch.where(torch.rand(m, generator=g) < 0.3, (y + 1) % classes, y)], 1)
        x = torch.randint(0, 256, (m, 3, 6, 6), generator=g, dtype=torch.uint8)
        x[:, 0] = (y * 60).to(torch.uint8)[:, None, None]  # the target is learnable
        return Split(x, y, b)

    return BiasedDataset("random", split(n), split(n // 2) if val else None, split(n // 2), classes, classes,
                         2 if two_bias else 1, (0.99, 0.95) if two_bias else 0.8,
                         "two-bias" if two_bias else "symmetric-rho", "random")


@pytest.fixture(scope="module")
def digits():
    data = pytest.importorskip("bise.data").load("colored-digits", seed=0)
    keep = torch.arange(400)
    return dataclasses.replace(data, train=data.train.subset(keep))


@pytest.fixture(scope="module")
def vanilla_mlp(digits):
    return train_vanilla(digits, "mlp", epochs=2, quiet=True)


def test_temperature_schedule_at_paper_defaults():
    config = ExtractConfig()
    taus = [config.temperature(e) for e in range(101)]
    halved_at = [e for e in range(1, 101) if taus[e] != taus[e - 1]]
    assert halved_at == list(range(10, 101, 10))
    assert taus[99] > 1e-3 >= taus[100] == 0.5 ** 10
    short = ExtractConfig(mask_epochs=3)
    assert short.temperature(3) <= 1e-3 < short.temperature(2)


def test_tiny_extraction_history_selection_and_model_untouched(digits, vanilla_mlp):
    before = {k: v.clone() for k, v in vanilla_mlp.state_dict().items()}
    sub = extract(vanilla_mlp, digits, config=ExtractConfig(**TINY), quiet=True)
    assert [h["epoch"] for h in sub.history] == [1, 2, 3]
    assert [h["temperature"] for h in sub.history] == [1.0, 0.125, 0.015625]
    accs = [h["val_accuracy"] for h in sub.history]
    best = max(range(3), key=lambda i: (accs[i], i)) + 1  # ties go to the later epoch
    assert sub.info["best_epoch"] == best and sub.info["selection"] == "best validation accuracy"
    assert set(sub.masks) == {"features.relu1", "features.relu2", "features.relu3"}
    assert all(m.dtype == torch.bool and m.shape == (100,) for m in sub.masks.values())
    assert sub.history[best - 1]["units_kept"] == {n: int(m.sum()) for n, m in sub.masks.items()}
    assert all(torch.equal(sub.gates[n].mask(), m) for n, m in sub.masks.items())
    # the chosen epoch's recorded validation accuracy is the one of the model pruned by its masks
    assert sub.history[best - 1]["val_accuracy"] == sub.evaluate(digits.val)["accuracy"]
    assert all(torch.equal(v, before[k]) for k, v in vanilla_mlp.state_dict().items())
    assert not any(p.requires_grad for p in sub.model.parameters())
    metrics = sub.evaluate(digits.test)
    assert 0.0 <= metrics["conflicting_accuracy"] <= 1.0


def test_an_epochs_validation_runs_the_model_pruned_by_its_masks(digits, vanilla_mlp):
    """_Run.evaluate measures the masked model (a unit off is off): evaluating with scores of 0 where a
    unit is off (kept by the >= 0 rule) gave every epoch the unpruned model's metrics."""
    import contextlib

    from bise.evaluate import evaluate
    from bise.export import freeze_gates
    from bise.extract import prepare_run

    run = prepare_run(vanilla_mlp, digits, ExtractConfig(**TINY))
    masks = {n: torch.arange(g.num_channels) % 3 != 0 for n, g in run.gates.items()}
    masks["features.relu3"][:] = False  # the last layer off: one class predicted for every sample
    with run.prefix if run.prefix is not None else contextlib.nullcontext():
        accuracy, metrics = run.evaluate("val", masks, run.val)
    pruned = evaluate(freeze_gates(run.model, masks), digits.val)
    assert metrics == pruned and accuracy == pruned["accuracy"]
    assert pruned != evaluate(vanilla_mlp, digits.val)  # the masks change the metrics here
    assert all(bool((g.scores == 0).all()) for g in run.gates.values())  # the scores are back


def test_the_mask_optimiser_steps_the_scores_and_nothing_else(digits, vanilla_mlp):
    from bise.extract import prepare_run

    run = prepare_run(vanilla_mlp, digits, ExtractConfig(**TINY))
    ids = lambda opt: [id(p) for group in opt.param_groups for p in group["params"]]  # noqa: E731
    assert ids(run.mask_opt) == [id(g.scores) for g in run.gates.values()]
    assert ids(run.head_opt) == [id(p) for p in run.heads.parameters()]


def test_validation_ties_go_to_the_later_epoch(digits, vanilla_mlp, monkeypatch):
    from bise.extract import _Run

    monkeypatch.setattr(_Run, "evaluate", lambda self, key, masks, labels: (0.5, {"accuracy": 0.5}))
    sub = extract(vanilla_mlp, digits, config=ExtractConfig(**TINY), quiet=True)
    assert [h["val_accuracy"] for h in sub.history] == [0.5] * 3
    assert sub.info["best_epoch"] == 3 and sub.info["best_val_accuracy"] == 0.5


def test_cached_and_straightforward_loops_give_the_same_masks(digits):
    torch.manual_seed(0)
    model = build_model("simple-cnn", 10, digits.input_shape, width=0.25).eval()
    config = ExtractConfig(mask_epochs=2, head_epochs=2, batch_size=100)
    cached = extract(model, digits, config=config, quiet=True)
    plain = extract(model, digits, config=dataclasses.replace(config, cache_features=False), quiet=True)
    assert cached.info["prefix_cached"] and not plain.info["prefix_cached"]
    for name in cached.masks:
        assert torch.equal(cached.masks[name], plain.masks[name])
        torch.testing.assert_close(cached.scores[name], plain.scores[name], rtol=0, atol=1e-6)


def test_cached_prefix_without_the_chain_gives_the_loops_masks(digits, monkeypatch):
    """The mask step through autograd on cached prefix features (the path of amp and of models the
    GatedChain cannot express) equals the straightforward loop: each batch reads its own rows."""
    from bise.gated_chain import GatedChain

    torch.manual_seed(0)
    model = build_model("simple-cnn", 10, digits.input_shape, width=0.25).eval()
    config = ExtractConfig(mask_epochs=2, head_epochs=1, batch_size=100)
    monkeypatch.setattr(GatedChain, "build", staticmethod(lambda *args, **kwargs: None))
    cached = extract(model, digits, config=config, quiet=True)
    plain = extract(model, digits, config=dataclasses.replace(config, cache_features=False), quiet=True)
    assert cached.info["prefix_cached"]
    for name in cached.masks:
        assert torch.equal(cached.masks[name], plain.masks[name])
        torch.testing.assert_close(cached.scores[name], plain.scores[name], rtol=0, atol=1e-6)


def test_a_frozen_pass_is_recomputed_when_any_gates_mask_changes(digits, vanilla_mlp):
    """frozen() reuses a pass only while every gate's hard mask is unchanged (the last gate's too)."""
    from bise.extract import prepare_run

    run = prepare_run(vanilla_mlp, digits, ExtractConfig(**TINY))
    gates = list(run.gates.values())
    assert len(gates) >= 2
    calls = []

    def compute():
        calls.append(1)
        return torch.zeros(1)

    run.frozen("pass", compute)
    run.frozen("pass", compute)
    assert len(calls) == 1
    for gate in (gates[-1], gates[0]):
        with torch.no_grad():
            gate.scores.view(-1)[0] = -1.0 if bool(gate.mask().view(-1)[0]) else 1.0  # flip one channel
        run.frozen("pass", compute)
        run.frozen("pass", compute)
    assert len(calls) == 3


def test_data_without_validation_logs_test_metrics_with_the_prefix_cached(digits, vanilla_mlp):
    no_val = dataclasses.replace(digits, val=None)
    sub = extract(vanilla_mlp, no_val, config=ExtractConfig(**TINY, log_test=True), quiet=True)
    assert sub.info["prefix_cached"] and sub.info["selection"] == "last epoch"
    for record in sub.history:
        assert 0.0 <= record["test"]["unbiased_accuracy"] <= 1.0
    plain = extract(vanilla_mlp, no_val, config=ExtractConfig(**TINY, log_test=True, cache_features=False),
                    quiet=True)
    assert [r["test"] for r in plain.history] == [r["test"] for r in sub.history]


class _Interrupt(Exception):
    pass


def test_interrupted_run_resumes_to_identical_masks(tmp_path, digits, vanilla_mlp):
    config = ExtractConfig(**TINY)
    full = extract(vanilla_mlp, digits, config=config, quiet=True)

    def stop_after_two(epoch, record):
        if epoch == 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        extract(vanilla_mlp, digits, config=config, out_dir=tmp_path, quiet=True, callback=stop_after_two)
    with pytest.raises(ValueError, match="resume=True"):
        extract(vanilla_mlp, digits, config=config, out_dir=tmp_path, quiet=True)
    with pytest.raises(ValueError, match="checkpoint= is the content of out_dir's checkpoint, read to resume it"):
        extract(vanilla_mlp, digits, config=config, out_dir=tmp_path, quiet=True, checkpoint={})
    with pytest.raises(CheckpointError, match=r"checkpoint= \(what read_checkpoint.* lacks \['config'"):
        extract(vanilla_mlp, digits, config=config, out_dir=tmp_path, resume=True, quiet=True,
                checkpoint={"format": "bise-extract-checkpoint-v1"})  # failed later, on a missing key
    with pytest.raises(ValueError, match="different settings"):
        extract(vanilla_mlp, digits, config=dataclasses.replace(config, gamma=2.0), out_dir=tmp_path, resume=True,
                quiet=True)
    # another vanilla of the same architecture, or other data: resumed as if the checkpoint were theirs
    other_model = build_model("mlp", digits.num_classes, digits.input_shape)
    other_data = dataclasses.replace(digits, val=digits.val.subset(torch.arange(len(digits.val) - 1)))
    for model, data in ((other_model, digits), (vanilla_mlp, other_data)):
        with pytest.raises(ValueError, match="is an extraction of another model or other data"):
            extract(model, data, config=config, out_dir=tmp_path, resume=True, quiet=True)
    before = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)["timing"]
    torch.manual_seed(99)  # the caller's RNG plays no part (nothing of the run draws from it)
    resumed = extract(vanilla_mlp, digits, config=config, out_dir=tmp_path, resume=True, quiet=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    # the phase timings span the whole extraction, the part before the interruption included
    timing = resumed.info["timing_seconds"]
    assert timing["head_pretraining"] == before["head_pretraining"] > 0
    assert timing["mask_epochs"] > before["mask_epochs"] > 0
    for name in full.scores:
        assert torch.equal(full.scores[name], resumed.scores[name])
        assert torch.equal(full.masks[name], resumed.masks[name])
    assert not list(tmp_path.glob(".*.tmp"))


def test_seeded_calls_keep_the_callers_rng_and_repeat_their_results(digits):
    """train_vanilla, extract (label-free: the identification model and the heads) and finetune
    reseeded the global torch RNG (torch.manual_seed(seed)) and left it so."""
    from bise.finetune import finetune

    def workflow():
        model = train_vanilla(digits, "mlp", epochs=1, seed=3, quiet=True)
        sub = extract(model, digits, config=ExtractConfig(**TINY, label_free=True, seed=3), quiet=True)
        return model, sub, finetune(model, digits, epochs=1, seed=3, quiet=True)

    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = workflow()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)
    second = workflow()
    for a, b in ((first[0], second[0]), (first[2], second[2])):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    for name in first[1].scores:
        assert torch.equal(first[1].scores[name], second[1].scores[name])


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, digits, vanilla_mlp):
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        extract(vanilla_mlp, digits, config=ExtractConfig(**TINY), out_dir=tmp_path, resume=True, quiet=True)


def test_budget_keeps_exactly_the_top_fraction(digits, vanilla_mlp):
    sub = extract(vanilla_mlp, digits, config=ExtractConfig(**TINY, budget=0.3), quiet=True)
    assert sub.units_kept == 90
    assert sub.units_total == 300 and sub.units_pruned == pytest.approx(0.7)
    flat = torch.cat(list(sub.scores.values()))
    kept = torch.cat(list(sub.masks.values()))
    assert flat[kept].min() >= flat[~kept].max()
    # the returned model's gates keep the top-k units, not those whose score is >= 0
    assert all(torch.equal(sub.gates[n].mask(), m) for n, m in sub.masks.items())
    assert any(not torch.equal(sub.scores[n] >= 0, m) for n, m in sub.masks.items())


def test_a_budget_that_keeps_no_unit_is_named(digits, vanilla_mlp):
    """budget=1e-9 kept one unit (the top-k keeps at least one) where the budget asks for none. A budget that
    rounds to one unit is accepted: the top-k keeps round(budget * units)."""
    from bise.extract import check_budget

    with pytest.raises(ValueError, match=r"budget=1e-09 keeps round\(1e-09 \* 300\) = 0 of the model's 300 gated units"):
        extract(vanilla_mlp, digits, config=ExtractConfig(**TINY, budget=1e-9), quiet=True)
    check_budget(0.004, 300)  # round(1.2) = 1 unit
    check_budget(0.003, 300)  # round(0.9) = 1 unit
    with pytest.raises(ValueError, match="keeps round"):
        check_budget(0.001, 300)


def test_label_free_uses_pseudo_labels_and_empirical_joint(digits, vanilla_mlp, monkeypatch):
    import importlib

    sub = extract(vanilla_mlp, digits, config=ExtractConfig(**TINY, label_free=True, identification_epochs=5),
                  quiet=True)
    assert sub.info["weighting"] == "empirical-joint" and sub.info["label_free"]
    assert len(sub.history) == 3
    # the masks learned on a second draw: fine-tuning (on the vanilla's own training split) got the mask
    # set's pseudo labels, which belong to other images; it gets the ones predicted on its own split
    assert sub.info["mask_set"] == "fresh-draw"
    pseudo = sub.pseudo_bias
    assert len(pseudo["train"]) == len(digits.mask_train) != len(pseudo["vanilla_train"]) == len(digits.train)
    agree = (pseudo["vanilla_train"] == digits.train.b).float().mean()
    assert agree > 0.5, agree  # the identification model (a biased ERM model) predicts the bias
    given = {}
    monkeypatch.setattr(importlib.import_module("bise.finetune"), "finetune",
                        lambda model, data, **kwargs: given.update(kwargs) or model)
    sub.finetune(digits, 1)
    assert given["bias"] is pseudo["vanilla_train"]
    sub.pseudo_bias = {k: v for k, v in pseudo.items() if k != "vanilla_train"}  # saved by an earlier version
    with pytest.raises(ValueError, match="pseudo bias labels are of the mask set"):
        sub.finetune(digits, 1)


def test_two_bias_data_and_ablation_switches():
    data = _random_data(two_bias=True, val=False)
    model = build_model("mlp", 3, data.input_shape, width=0.2)
    sub = extract(model, data, config=ExtractConfig(**TINY), quiet=True)
    assert sub.info["selection"] == "last epoch" and sub.info["weighting"] == "two-bias"
    assert all(h["val"] is None for h in sub.history)
    for reweight, mi in ((False, True), (True, False), (False, False)):
        extract(model, data, config=ExtractConfig(mask_epochs=1, head_epochs=1, reweight=reweight, mi=mi), quiet=True)


def test_heads_get_no_update_from_the_mi_term(tmp_path):
    data = _random_data(n=100)
    model = build_model("mlp", 3, data.input_shape, width=0.2)
    one_step = ExtractConfig(mask_epochs=1, head_epochs=0, batch_size=100)  # exactly one training step
    runs = {}
    for gamma in (0.0, 1.0):
        extract(model, data, config=dataclasses.replace(one_step, gamma=gamma), out_dir=tmp_path / str(gamma),
                quiet=True)
        runs[gamma] = torch.load(tmp_path / str(gamma) / CHECKPOINT_NAME, weights_only=True)
    assert runs[1.0]["history"][0]["mi"] > 0
    assert any(not torch.equal(runs[0.0]["scores"][n], runs[1.0]["scores"][n]) for n in runs[0.0]["scores"])
    for key, value in runs[0.0]["heads"].items():
        assert torch.equal(value, runs[1.0]["heads"][key])


def test_subnetwork_save_and_load_roundtrip(tmp_path):
    data = _random_data()
    model = build_model("mlp", 3, data.input_shape, width=0.2)
    sub = extract(model, data, config=ExtractConfig(mask_epochs=1, head_epochs=1), quiet=True)
    sub.save(tmp_path / "sub.pt")
    again = Subnetwork.load(tmp_path / "sub.pt")
    x = data.test.inputs()
    assert torch.equal(sub.model(x), again.model(x))
    assert all(torch.equal(sub.masks[n], again.masks[n]) for n in sub.masks)
    # loaded as extract returns it: frozen, eval, gates pruned; the same counts, history and info
    assert not again.model.training and not any(p.requires_grad for p in again.model.parameters())
    assert all(g.enabled and not g.scores.requires_grad for g in again.gates.values())
    assert (again.units_kept, again.units_total, again.units_pruned) == (sub.units_kept, sub.units_total,
                                                                         sub.units_pruned)
    assert again.units_pruned == 1.0 - again.units_kept / again.units_total
    assert again.history == sub.history and again.info == sub.info
    other = torch.load(tmp_path / "sub.pt", weights_only=True)
    torch.save({**other, "format": "bise-subnetwork-v0"}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"old.pt is not a saved Subnetwork \(format 'bise-subnetwork-v0'\)"):
        Subnetwork.load(tmp_path / "old.pt")


def test_a_custom_subnetwork_loads_into_a_fresh_instance(tmp_path):
    """Loading a custom model's Subnetwork asked the user to call insert_gates with "the saved gate
    names" first, names that only the file held; example_input= now lets load insert them."""
    data = _random_data()
    net = lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(108, 16), torch.nn.ReLU(),  # noqa: E731
                                      torch.nn.Linear(16, 3))
    torch.manual_seed(0)
    sub = extract(net(), data, config=ExtractConfig(mask_epochs=1, head_epochs=1), quiet=True)
    sub.save(tmp_path / "sub.pt")
    with pytest.raises(ValueError, match=r"its gates are \['2'\]: pass example_input="):
        Subnetwork.load(tmp_path / "sub.pt", model=net())
    again = Subnetwork.load(tmp_path / "sub.pt", model=net(), example_input=data.train.inputs()[:2])
    x = data.test.inputs()
    assert list(again.gates) == ["2"] and torch.equal(sub.model(x), again.model(x))
    # the caller's model was gated in place, and stayed so when the load failed with torch's RuntimeError
    wrong = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(108, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with pytest.raises(ValueError, match="sub.pt: model= is not the architecture it was saved from"):
        Subnetwork.load(tmp_path / "sub.pt", model=wrong, example_input=data.train.inputs()[:2])
    mine = net()
    assert Subnetwork.load(tmp_path / "sub.pt", model=mine, example_input=data.train.inputs()[:2]).model is not mine
    assert not gates_of(mine) and not gates_of(wrong)
    elsewhere = net()  # the same architecture, gated at another module: named, not loaded
    insert_gates(elsewhere, ["1"], example_input=data.train.inputs()[:2])
    with pytest.raises(ValueError, match=r"the model's gates \['1'\]\.\.\. differ from the saved ones \['2'\]"):
        Subnetwork.load(tmp_path / "sub.pt", model=elsewhere)


def test_the_head_reads_the_input_of_the_linear_that_runs_last():
    """A model that registers its head first: extraction gated and tapped the feature layers by
    registration order (bottleneck "2", the classifier's input left ungated)."""

    class HeadFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 3)
            self.features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(108, 16), torch.nn.ReLU(),
                                                torch.nn.Linear(16, 16), torch.nn.ReLU())

        def forward(self, x):
            return self.fc(self.features(x))

    torch.manual_seed(0)
    sub = extract(HeadFirst(), _random_data(), config=ExtractConfig(mask_epochs=1, head_epochs=1), quiet=True)
    assert sub.info["bottleneck"] == "fc"
    assert list(sub.gates) == ["features.2", "features.4"]


def test_bad_input_is_refused():
    data = _random_data()
    model = build_model("mlp", 3, data.input_shape, width=0.2)
    config = ExtractConfig(mask_epochs=1, head_epochs=0)
    with pytest.raises(ValueError, match="as many bias classes .*num_bias_classes=2 .if bias class 2 merely has no "
                                         "sample, give num_bias_classes=3 in the data spec."):
        extract(model, dataclasses.replace(data, num_bias_classes=2), config=config, quiet=True)
    with pytest.raises(ValueError, match="bias labels are missing"):
        extract(model, dataclasses.replace(data, train=Split(data.train.x, data.train.y, None)), config=config,
                quiet=True)
    with pytest.raises(ValueError, match="no gateable layer"):
        extract(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(108, 3)), data, config=config, quiet=True)
    with pytest.raises(ValueError, match="bottleneck"):
        extract(model, data, config=dataclasses.replace(config, bottleneck="head"), quiet=True)
    with pytest.raises(ValueError, match="budget"):
        extract(model, data, config=ExtractConfig(budget=1.5), quiet=True)


def test_label_free_needs_no_bias_labels():
    """Neither the extraction nor BISE+FT: fine-tuning selected its epoch with the bias metrics of the val
    split and failed after its first epoch ('split.b is None'); it selects on accuracy there, as the extraction."""
    data = _random_data()
    data = dataclasses.replace(data, train=Split(data.train.x, data.train.y, None),
                               val=Split(data.val.x, data.val.y, None))
    model = build_model("mlp", 3, data.input_shape, width=0.2)
    sub = extract(model, data, config=ExtractConfig(mask_epochs=1, head_epochs=1, label_free=True), quiet=True)
    assert sub.pseudo_bias["train"].shape == data.train.y.shape
    history = []
    tuned = sub.finetune(data, 2, quiet=True, history=history)
    accuracy = float((predict(tuned, data.val) == data.val.y).float().mean())
    assert [set(r["val"]) for r in history] == [{"accuracy"}] * 2
    assert accuracy == max(r["val"]["accuracy"] for r in history)


def test_subnetwork_finetune_takes_the_mask_learning_batch_size(digits, vanilla_mlp, monkeypatch):
    """Subnetwork.finetune trained with the recipe's batch size (256) where its docs and the CLI use the
    extraction's (here 50)."""
    module = sys.modules["bise.finetune"]
    seen, real = [], module.train_epoch
    monkeypatch.setattr(module, "train_epoch", lambda model, split, opt, gen, batch_size, *a, **k: (
        seen.append(batch_size), real(model, split, opt, gen, batch_size, *a, **k))[1])
    sub = extract(vanilla_mlp, digits, config=ExtractConfig(**{**TINY, "batch_size": 50}), quiet=True)
    sub.finetune(digits, 1, quiet=True)
    sub.finetune(digits, 1, quiet=True, batch_size=64)
    assert seen == [50, 64]


def test_subnetwork_finetune_takes_the_extractions_weighting_and_rho(digits, vanilla_mlp, monkeypatch):
    """BISE+FT reweights as the masks were learnt: the extraction's rho (here not the data's 0.99) and scheme."""
    seen = {}
    monkeypatch.setattr(sys.modules["bise.finetune"], "finetune", lambda model, data, epochs, **kw: seen.update(kw))
    sub = extract(vanilla_mlp, digits, config=ExtractConfig(**{**TINY, "mask_epochs": 1, "rho": 0.9}), quiet=True)
    sub.finetune(digits, 1)
    assert (seen["rho"], seen["scheme"], seen["batch_size"]) == (0.9, sub.info["weighting"], 50)
    sub.finetune(digits, 1, rho=0.8)
    assert seen["rho"] == 0.8



def test_label_free_finetune_counts_the_pseudo_labels_as_classes():
    """The pseudo bias labels are predicted classes, in [0, num_classes): Subnetwork.finetune weighed them
    with the data's num_bias_classes, so data with fewer bias classes than classes failed at BISE+FT
    ('shape [3, 2] is invalid for input of size 7')."""
    data = _random_data()
    data = dataclasses.replace(data, num_bias_classes=2, train=data.train.subset(slice(None)))
    data.train.b = data.train.b % 2
    model = build_model("mlp", 3, data.input_shape, width=0.2)
    sub = extract(model, data, config=ExtractConfig(mask_epochs=1, head_epochs=1, label_free=True), quiet=True)
    sub.pseudo_bias["train"] = torch.arange(len(data.train)) % 3  # an identification model predicting every class
    history = []
    sub.finetune(data, 1, quiet=True, history=history)
    assert len(history) == 1

@pytest.mark.parametrize("arch, prefix", [("simple-cnn", ["conv1", "bn1"]), ("mlp", ["fc1"]),
                                          ("resnet18", ["conv1", "bn1", "relu", "maxpool"]),
                                          ("mobilenetv2", ["0"])])
def test_frozen_prefix_of_the_builtins(arch, prefix):
    from bise.feature_cache import FrozenPrefix, find_prefix
    from bise.gates import insert_gates

    model = build_model(arch, 3, (3, 16, 16), width=0.25).eval()
    insert_gates(model)
    x = torch.rand(4, 3, 16, 16)
    assert [name for _, name, _ in find_prefix(model, x)] == prefix
    cache = FrozenPrefix.build(model, x, 4, 2**30)
    with torch.no_grad():
        reference = model(x)
        cached = cache.compute(lambda idx: x[idx], 4, 3)
        with cache:
            replayed = cache.run(cached)
        assert torch.equal(model(x), reference)  # the original modules are back
    torch.testing.assert_close(replayed, reference, rtol=1e-5, atol=1e-6)


def test_frozen_prefix_falls_back_when_the_forward_is_not_a_chain():
    from bise.feature_cache import FrozenPrefix
    from bise.gates import insert_gates

    class Skip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)
            self.block = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.ReLU())
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            a = self.conv(x)
            return self.fc((self.block(self.bn(a)) + a).mean((2, 3)))  # reuses a non-final prefix output

    model = Skip().eval()
    x = torch.rand(4, 3, 5, 5)
    insert_gates(model, example_input=x)
    with pytest.warns(UserWarning, match="does not reproduce"):
        assert FrozenPrefix.build(model, x, 4, 2**30) is None


def test_frozen_passes_are_reused_exactly_while_the_masks_are_unchanged(digits, vanilla_mlp, monkeypatch):
    """Reusing features / predictions for unchanged masks changes nothing; and it does happen.

    alpha = gamma = 0 leaves the scores at 0, so every mask stays; the heads still train.
    """
    from bise.extract import _Run

    config = ExtractConfig(mask_epochs=6, head_epochs=1, batch_size=50, alpha=0.0, gamma=0.0)
    computed = []
    frozen = _Run.frozen

    def counting(self, name, compute):
        return frozen(self, name, lambda: computed.append(name) or compute())

    monkeypatch.setattr(_Run, "frozen", counting)
    reused = extract(vanilla_mlp, digits, config=config, quiet=True)
    monkeypatch.setattr(_Run, "frozen", lambda self, name, compute: compute())
    fresh = extract(vanilla_mlp, digits, config=config, quiet=True)
    assert all(torch.equal(reused.masks[n], fresh.masks[n]) for n in fresh.masks)
    assert [r["val"] for r in reused.history] == [r["val"] for r in fresh.history]
    assert computed.count("predictions val") == 1 and computed.count("features") == 2  # "off", then the masks


def test_a_class_beyond_num_classes_is_named():
    """A hand-made split whose y exceeds data.num_classes failed inside a reshape of the weight table."""
    data = _random_data(classes=3)
    train = Split(data.train.x, data.train.y.clone(), data.train.b)
    train.y[0] = 3
    model = build_model("mlp", 3, data.input_shape, width=0.2)
    with pytest.raises(ValueError, match="data.train.y holds class 3, but data.num_classes is 3"):
        extract(model, dataclasses.replace(data, train=train), config=ExtractConfig(**TINY), quiet=True)


def test_finetune_takes_its_defaults_from_the_recipe_and_its_arguments(digits, monkeypatch):
    """lr: LR_FACTOR (0.01) x the recipe's of ``arch`` (else the model's recorded one); the optimiser of
    that recipe; batch size, scheme, rho, bias and num_bias_classes as given, else the data's."""
    from bise import losses
    from bise.finetune import finetune

    module = sys.modules["bise.finetune"]
    seen = {}
    real_opt, real_epoch, real_table = module._optimizer, module.train_epoch, losses.weight_table
    monkeypatch.setattr(module, "_optimizer", lambda params, recipe, lr: (
        seen.update(lr=lr, optimizer=recipe["optimizer"]), real_opt(params, recipe, lr))[1])
    monkeypatch.setattr(module, "train_epoch", lambda model, split, opt, gen, batch_size, *a, **k: (
        seen.update(batch_size=batch_size), real_epoch(model, split, opt, gen, batch_size, *a, **k))[1])
    monkeypatch.setattr(losses, "weight_table", lambda scheme, **kw: (
        seen.update(scheme=scheme, **kw), real_table(scheme, **kw))[1])
    model = build_model("mlp", digits.num_classes, digits.input_shape, width=0.2)
    finetune(model, digits, epochs=1, quiet=True)
    assert (seen["lr"], seen["optimizer"], seen["batch_size"]) == (pytest.approx(1e-5), "adam", 256)
    assert (seen["scheme"], seen["rho"], seen["num_bias_classes"]) == (digits.weighting, digits.rho,
                                                                       digits.num_bias_classes)
    assert torch.equal(seen["bias"], digits.train.b.long())
    bias = torch.arange(len(digits.train)) % 3
    finetune(model, digits, epochs=1, quiet=True, arch="simple-cnn", batch_size=64, scheme="group-balanced",
             rho=0.9, bias=bias, num_bias_classes=3)
    assert (seen["lr"], seen["optimizer"], seen["batch_size"]) == (pytest.approx(1e-3), "sgd", 64)
    assert (seen["scheme"], seen["rho"], seen["num_bias_classes"]) == ("group-balanced", 0.9, 3)
    assert torch.equal(seen["bias"], bias)
    finetune(model, digits, epochs=1, quiet=True, lr=0.05)
    assert seen["lr"] == 0.05
    more_bias_classes = dataclasses.replace(_random_data(), num_bias_classes=4)
    finetune(build_model("mlp", 3, more_bias_classes.input_shape, width=0.2), more_bias_classes, epochs=1, quiet=True)
    assert seen["num_bias_classes"] == 4


def test_finetune_trains_in_train_mode(digits, monkeypatch):
    """BatchNorm in train mode while fine-tuning (module docstring): every epoch runs model.train()."""
    from bise.finetune import finetune

    module = sys.modules["bise.finetune"]
    modes, real = [], module.train_epoch
    monkeypatch.setattr(module, "train_epoch", lambda model, *a, **k: (modes.append(model.training),
                                                                        real(model, *a, **k))[1])
    model = build_model("simple-cnn", digits.num_classes, digits.input_shape, width=0.25).eval()
    finetune(model, digits, epochs=2, quiet=True)
    assert modes == [True, True]


def test_finetune_refuses_a_bias_label_count_other_than_the_training_sets(digits):
    from bise.finetune import finetune

    model = build_model("mlp", digits.num_classes, digits.input_shape, width=0.2)
    for n in (len(digits.train) - 1, len(digits.train) + 1):
        with pytest.raises(ValueError, match="one bias label per training sample"):
            finetune(model, digits, epochs=1, quiet=True, bias=torch.zeros(n, dtype=torch.long))


def test_finetune_keeps_the_best_val_epoch_ties_to_the_later_and_leaves_the_input_model(digits, monkeypatch):
    """The weights of the epoch with the best val accuracy (ties: the later epoch) are returned, frozen and
    in eval mode; the history numbers the epochs from 1; the model given is not modified."""
    import copy

    from bise.finetune import finetune

    module = sys.modules["bise.finetune"]
    accuracies, states = iter([0.5, 0.7, 0.7, 0.6]), []

    def scripted_evaluate(model, split, device="cpu"):
        states.append(copy.deepcopy(model.state_dict()))
        return {"accuracy": next(accuracies)}

    monkeypatch.setattr(module, "evaluate", scripted_evaluate)
    assert digits.val is not None and digits.val.b is not None
    model = build_model("mlp", digits.num_classes, digits.input_shape, width=0.2)
    before = copy.deepcopy(model.state_dict())
    history = []
    tuned = finetune(model, digits, epochs=4, lr=0.01, quiet=True, history=history)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert tuned is not model and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(torch.equal(states[2][k], states[3][k]) for k in ("features.fc1.weight",))  # epochs differ
    assert all(torch.equal(states[2][k], v) for k, v in tuned.state_dict().items())  # epoch 3: the later tie
    assert not tuned.training and not any(p.requires_grad for p in tuned.parameters())


# ---------------------------------------------------------------- mutation audit (auditM): gaps found


def test_tau_stop_equal_to_tau0_and_exact_halving_counts():
    with pytest.raises(ValueError, match=r"tau_stop \(1.0\) must be below tau0 \(1.0\)"):
        ExtractConfig(tau0=1.0, tau_stop=1.0).validate()
    # log(tau_stop / tau0) / log(tau_factor) is an integer plus rounding error here: no extra halving
    assert ExtractConfig(tau_factor=0.1, tau_stop=1e-5).halvings == 5
    assert ExtractConfig(tau_factor=0.2, tau_stop=0.008).halvings == 3


def test_a_budget_of_one_keeps_every_unit():
    data = _random_data()
    model = build_model("mlp", 3, data.input_shape, width=0.2)
    ExtractConfig(budget=1).validate()
    sub = extract(model, data, config=ExtractConfig(mask_epochs=1, head_epochs=0, budget=1.0), quiet=True)
    assert sub.units_kept == sub.units_total


def test_a_bias_label_equal_to_num_bias_classes_is_named():
    data = _random_data()
    train = data.train.subset(slice(None))
    train.b = train.b.clone()
    train.b[0] = data.num_bias_classes
    model = build_model("mlp", 3, data.input_shape, width=0.2)
    with pytest.raises(ValueError, match=r"train.b holds labels outside \[0, num_bias_classes=3\)"):
        extract(model, dataclasses.replace(data, train=train), config=ExtractConfig(mask_epochs=1, head_epochs=0),
                quiet=True)


@pytest.mark.parametrize("variant", [dict(gamma=1000.0, alpha=2.0), dict(mi=False), dict(two_bias=True)])
def test_the_chain_step_and_the_straightforward_loop_agree_off_the_defaults(variant):
    """The cached GatedChain step (bise.mask_loss for the default objective) and the autograd loop compute the
    same step for every objective: gamma/alpha, the mi=False ablation, and two heads (two biases)."""
    variant = dict(variant)
    data = _random_data(two_bias=variant.pop("two_bias", False))
    torch.manual_seed(0)
    model = build_model("mlp", 3, data.input_shape, width=0.2)
    config = ExtractConfig(mask_epochs=2, head_epochs=1, batch_size=60, **variant)
    cached = extract(model, data, config=config, quiet=True)
    plain = extract(model, data, config=dataclasses.replace(config, cache_features=False), quiet=True)
    assert cached.info["prefix_cached"] and not plain.info["prefix_cached"]
    if not config.mi:
        assert all(h["mi"] == 0 for h in cached.history + plain.history)
    for a, b in zip(cached.history, plain.history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
        assert a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-5, abs=1e-6)
    for name in cached.scores:
        torch.testing.assert_close(cached.scores[name], plain.scores[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("cache_features", [True, False])
def test_reweight_false_is_plain_cross_entropy(monkeypatch, cache_features):
    from bise import losses

    data = _random_data()
    model = build_model("mlp", 3, data.input_shape, width=0.2)
    monkeypatch.setattr(losses, "reweighted_cross_entropy", lambda *a, **k: pytest.fail("reweighted with reweight=False"))
    extract(model, data, config=ExtractConfig(mask_epochs=1, head_epochs=0, reweight=False,
                                              cache_features=cache_features), quiet=True)


@pytest.mark.parametrize("cache_features", [True, False])
def test_a_mask_epoch_trains_the_bias_head_too(cache_features):
    """Section 6: each mask step also steps the auxiliary head (on the detached z)."""
    import contextlib

    from bise.extract import prepare_run

    data = _random_data()
    model = build_model("mlp", 3, data.input_shape, width=0.2)
    run = prepare_run(model, data, ExtractConfig(mask_epochs=2, head_epochs=0, cache_features=cache_features))
    before = {k: v.clone() for k, v in run.heads.state_dict().items()}
    with run.prefix if run.prefix is not None else contextlib.nullcontext():
        run.mask_epoch()
    assert any(not torch.equal(v, run.heads.state_dict()[k]) for k, v in before.items())


def test_label_free_validation_metrics_use_the_true_bias_labels(digits, vanilla_mlp):
    """The pseudo labels train the masks; an epoch's val metrics (aligned / conflicting / groups) are measured
    against the data's bias labels."""
    import contextlib

    from bise.evaluate import evaluate
    from bise.export import freeze_gates
    from bise.extract import prepare_run

    run = prepare_run(vanilla_mlp, digits, ExtractConfig(**TINY, label_free=True, mask_set="vanilla-train"))
    assert not torch.equal(run.val.b, digits.val.b)  # the identification model's labels differ somewhere
    masks = {n: torch.arange(g.num_channels) % 3 != 0 for n, g in run.gates.items()}
    with run.prefix if run.prefix is not None else contextlib.nullcontext():
        _, metrics = run.evaluate("val", masks, run.val)
    assert metrics == evaluate(freeze_gates(run.model, masks), digits.val)


def test_no_head_refit_after_the_last_halving_unless_asked(digits, vanilla_mlp, monkeypatch):
    from bise.extract import _Run

    # pre-training + a refit per halving: a halving at each of the 3 epochs, or (tau_stop=0.25) at epochs 2 and 3
    for tau_stop, refit_after_last, expected in ((1e-3, False, 3), (1e-3, True, 4), (0.25, False, 2), (0.25, True, 3)):
        seen = []
        monkeypatch.setattr(_Run, "head_phase", lambda self, desc: seen.append(desc))
        config = ExtractConfig(**TINY, tau_stop=tau_stop, refit_after_last=refit_after_last)
        sub = extract(vanilla_mlp, digits, config=config, quiet=True)
        assert len(seen) == expected, seen
        assert sub.info["final_refit_skipped"] is not refit_after_last


def test_resume_refuses_another_seed_or_other_images(tmp_path, digits, vanilla_mlp):
    config = ExtractConfig(**TINY)

    def stop(epoch, record):
        raise _Interrupt

    with pytest.raises(_Interrupt):
        extract(vanilla_mlp, digits, config=config, out_dir=tmp_path, quiet=True, callback=stop)
    with pytest.raises(ValueError, match=r"different settings \(\['seed'\]\)"):
        extract(vanilla_mlp, digits, config=dataclasses.replace(config, seed=1), out_dir=tmp_path, resume=True,
                quiet=True)
    # the same labels, other images: the fingerprint covers the inputs too
    val = digits.val
    other = dataclasses.replace(digits, val=Split(255 - val.x, val.y, val.b))
    with pytest.raises(ValueError, match="is an extraction of another model or other data"):
        extract(vanilla_mlp, other, config=config, out_dir=tmp_path, resume=True, quiet=True)
    resumed = extract(vanilla_mlp, digits, config=config, out_dir=tmp_path, resume=True, quiet=True)
    assert resumed.info["mask_epochs_run"] == 2  # epochs 2 and 3; the interrupted run did epoch 1


def test_a_checkpoint_is_written_after_head_pretraining(tmp_path, digits, vanilla_mlp, monkeypatch):
    from bise.extract import _Run

    def interrupted(self):
        raise _Interrupt

    monkeypatch.setattr(_Run, "mask_epoch", interrupted)
    with pytest.raises(_Interrupt):
        extract(vanilla_mlp, digits, config=ExtractConfig(**TINY), out_dir=tmp_path, quiet=True)
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["history"] == [] and ckpt["timing"]["head_pretraining"] > 0


def test_the_optimisers_take_every_setting_of_the_config(digits, vanilla_mlp):
    from bise.extract import prepare_run

    config = ExtractConfig(**TINY, mask_lr=0.03, mask_momentum=0.5, mask_weight_decay=0.25, head_lr=0.07,
                           head_momentum=0.3, head_weight_decay=0.125)
    run = prepare_run(vanilla_mlp, digits, config)
    for opt, prefix in ((run.mask_opt, "mask"), (run.head_opt, "head")):
        group = opt.param_groups[0]
        assert (group["lr"], group["momentum"], group["weight_decay"]) == tuple(
            getattr(config, f"{prefix}_{k}") for k in ("lr", "momentum", "weight_decay"))


def test_validation_without_bias_labels_selects_on_accuracy():
    data = _random_data()
    data = dataclasses.replace(data, val=Split(data.val.x, data.val.y, None))
    model = build_model("mlp", 3, data.input_shape, width=0.2)
    sub = extract(model, data, config=ExtractConfig(mask_epochs=2, head_epochs=1), quiet=True)
    assert sub.info["selection"] == "best validation accuracy"
    assert all(set(h["val"]) == {"accuracy"} for h in sub.history)


def test_extract_gives_the_deterministic_mode_back(digits, vanilla_mlp):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        extract(vanilla_mlp, digits, config=ExtractConfig(**{**TINY, "mask_epochs": 1}), quiet=True)
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def test_a_gated_model_starts_from_zero_scores_at_tau0(digits, vanilla_mlp):
    import copy

    from bise.extract import prepare_run

    gated = copy.deepcopy(vanilla_mlp)
    insert_gates(gated, example_input=digits.train.inputs(torch.arange(2)))
    for g in gates_of(gated).values():
        with torch.no_grad():
            g.scores.fill_(-2.0)
        g.temperature = 0.01
    run = prepare_run(gated, digits, ExtractConfig(**TINY))
    assert all(bool((g.scores == 0).all()) and g.temperature == 1.0 for g in run.gates.values())
