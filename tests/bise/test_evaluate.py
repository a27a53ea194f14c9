"""Metrics on hand-computed examples; evaluate() on a model and a split."""

import pytest
import torch
from torch import nn

from bise.evaluate import evaluate, metrics_from_predictions, predict


def test_single_bias_by_hand():
    y = torch.tensor([0, 0, 1, 1, 1, 0])
    b = torch.tensor([0, 1, 1, 0, 1, 0])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])  # correct: 1 0 1 1 0 1
    m = metrics_from_predictions(pred, y, b)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["aligned_accuracy"] == pytest.approx(3 / 4)
    assert m["conflicting_accuracy"] == pytest.approx(1 / 2)
    assert m["groups"] == pytest.approx({"y=0,b=0": 1.0, "y=0,b=1": 0.0, "y=1,b=0": 1.0, "y=1,b=1": 0.5})
    assert m["unbiased_accuracy"] == pytest.approx(0.625)
    assert m["worst_group_accuracy"] == 0.0
    assert "patterns" not in m


def test_unbiased_equals_accuracy_on_balanced_set():
    y = torch.tensor([0, 0, 1, 1] * 3)
    b = torch.tensor([0, 1, 0, 1] * 3)
    pred = torch.tensor([0, 1, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1])
    m = metrics_from_predictions(pred, y, b)
    assert m["unbiased_accuracy"] == pytest.approx(m["accuracy"])


def test_no_conflicting_samples_gives_none():
    m = metrics_from_predictions(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert m["conflicting_accuracy"] is None and m["aligned_accuracy"] == 1.0


def test_groups_without_samples_are_left_out_of_the_table_and_the_means():
    """Only the (y, b) groups present count: the empty y=0,b=1 and y=1,b=0 (their bincount slots) are
    neither listed nor averaged in (at accuracy 0 they halved the unbiased and zeroed the worst)."""
    m = metrics_from_predictions(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert m["groups"] == {"y=0,b=0": 1.0, "y=1,b=1": 1.0}
    assert m["unbiased_accuracy"] == m["worst_group_accuracy"] == 1.0


def test_two_bias_patterns_by_hand():
    y = torch.tensor([0, 1, 2, 3])
    b = torch.tensor([[0, 0], [1, 2], [0, 1], [0, 0]])
    pred = torch.tensor([0, 1, 2, 0])  # correct: 1 1 1 0
    m = metrics_from_predictions(pred, y, b)
    assert m["patterns"] == {"aligned/aligned": 1.0, "aligned/conflicting": 1.0, "conflicting/aligned": None,
                             "conflicting/conflicting": 0.5}
    assert m["pattern_average"] == pytest.approx(2.5 / 3)
    assert m["aligned_accuracy"] == 1.0 and m["conflicting_accuracy"] == pytest.approx(2 / 3)
    assert m["groups"] == {"y=0,b=0/0": 1.0, "y=1,b=1/2": 1.0, "y=2,b=0/1": 1.0, "y=3,b=0/0": 0.0}
    assert m["unbiased_accuracy"] == 0.75 and m["worst_group_accuracy"] == 0.0


def test_bad_shapes():
    with pytest.raises(ValueError, match="same length"):
        metrics_from_predictions(torch.zeros(3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="b must have shape"):
        metrics_from_predictions(torch.zeros(2), torch.zeros(2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="empty"):
        metrics_from_predictions(torch.zeros(0), torch.zeros(0), torch.zeros(0))


class _Split:
    def __init__(self, x, y, b):
        self.x, self.y, self.b = x, y, b

    def __len__(self):
        return len(self.y)

    def inputs(self, index=None):
        return self.x if index is None else self.x[index]


def test_evaluate_matches_predictions_and_restores_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Dropout(0.5))
    split = _Split(torch.rand(50, 3, 2, 2), torch.randint(0, 3, (50,)), torch.randint(0, 3, (50,)))
    model.train()
    m = evaluate(model, split, batch_size=7)
    assert model.training
    with torch.no_grad():
        pred = model.eval()(split.x).argmax(1)
    assert m == metrics_from_predictions(pred, split.y, split.b)
    assert torch.equal(predict(model, split, batch_size=50), pred)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, split, batch_size=0)
    with pytest.raises(TypeError, match="data split"):
        evaluate(model, object())


def test_a_split_without_bias_labels_is_named_before_predicting():
    """A split with b=None (bias labels missing, as the label-free variant allows) failed after the
    whole prediction pass with 'Could not infer dtype of NoneType'."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    split = _Split(torch.rand(5, 3, 2, 2), torch.randint(0, 3, (5,)), None)
    with pytest.raises(ValueError, match=r"split\.b is None: the metrics need the bias labels"):
        evaluate(model, split)


def test_a_model_on_another_device_is_named():
    """evaluate moves the data to ``device``, not the model: a model left on another device (e.g. on
    the CPU with device="cuda") failed inside its first layer with torch's device-mismatch error. A
    meta-device model stands in for that here (no GPU needed)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).to("meta")
    split = _Split(torch.rand(5, 3, 2, 2), torch.randint(0, 3, (5,)), torch.randint(0, 3, (5,)))
    with pytest.raises(ValueError, match=r"the model is on meta, device='cpu': move it there first \(model.to\('cpu'\)\)"):
        evaluate(model, split)


def test_evaluate_of_a_dataset_measures_test_and_val():
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    split = lambda n: _Split(torch.rand(n, 3, 2, 2), torch.randint(0, 3, (n,)), torch.randint(0, 3, (n,)))  # noqa: E731
    data = SimpleNamespace(test=split(20), val=split(10))
    out = evaluate(model, data)
    assert set(out) == {"test", "val"}
    assert out["val"] == evaluate(model, data.val) and out["test"] == evaluate(model, data.test)
    assert set(evaluate(model, SimpleNamespace(test=data.test, val=None))) == {"test"}
