"""Gate insertion into arbitrary modules, modes, the straight-through gradient, the bottleneck."""

import pytest
import torch
from torch import nn

from bise.gates import Gated, find_bottleneck, gates_of, insert_gates, remove_gates, set_gate_mode


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.conv(x)) + x


class Net(nn.Module):
    """A torchvision-like user model: stem ReLU as a direct child, blocks, head with a final Sigmoid."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.blocks = nn.Sequential(Block(4), Block(4))
        self.fc = nn.Linear(4, 3)
        self.out = nn.Sigmoid()

    def forward(self, x):
        x = self.blocks(self.relu(self.stem(x)))
        return self.out(self.fc(x.mean((2, 3))))


def test_auto_placement_skips_stem_and_head():
    model = Net()
    gates = insert_gates(model, example_input=torch.rand(2, 3, 5, 5))
    assert list(gates) == ["blocks.0.act", "blocks.1.act"]
    assert isinstance(model.blocks[0].act, Gated) and gates["blocks.0.act"].num_channels == 4
    assert gates_of(model).keys() == gates.keys()


class RootActAfterFeatures(nn.Module):
    """A stem ReLU at the root, nested features, then root ReLUs between the features and the classifier."""

    def __init__(self):
        super().__init__()
        self.stem, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()
        self.features = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.fc1, self.act1, self.fc2 = nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)

    def forward(self, x):
        x = self.features(self.relu(self.stem(x))).mean((2, 3))
        return self.fc2(self.act1(self.fc1(x)))


def test_the_stem_is_the_root_activations_before_the_first_deeper_one():
    """A root activation that runs after the nested features (before the classifier) is not the stem: it
    was left ungated because it is a direct child of the root; a flat model has no stem."""
    gates = insert_gates(RootActAfterFeatures(), example_input=torch.rand(2, 3, 5, 5))
    assert list(gates) == ["features.1", "act1"] and gates["act1"].num_channels == 6
    flat = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    assert list(insert_gates(flat, example_input=torch.rand(2, 3))) == ["1", "3"]


def test_names_and_exclude_choose_modules():
    model = Net()
    gates = insert_gates(model, ["relu", "blocks.*.act"], exclude=["blocks.1.*"], example_input=torch.rand(1, 3, 4, 4))
    assert list(gates) == ["relu", "blocks.0.act"]
    with pytest.raises(ValueError, match=r"names pattern\(s\) \['nothing\*'\] match no module of Net"):
        insert_gates(Net(), ["relu", "nothing*"], example_input=torch.rand(1, 3, 4, 4))


def test_an_exclude_pattern_that_matches_no_gated_module_is_refused():
    """exclude=["blocks.1"] (the block, not its activation) excluded nothing and left blocks.1.act gated,
    silently; a pattern that removes a module names none it could remove is a typo."""
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"exclude pattern\(s\) \['blocks.1'\] match no activation module of "
                                         r"Net .*those are: relu, blocks.0.act, blocks.1.act, out$"):
        insert_gates(Net(), exclude=["blocks.*.act", "blocks.1"], example_input=x)
    with pytest.raises(ValueError, match=r"\['blocks.1.act'\] match no module of Net picked by names .*those are: relu$"):
        insert_gates(Net(), ["relu"], exclude=["blocks.1.act"], example_input=x)
    assert list(insert_gates(Net(), exclude=["relu", "blocks.0.*"], example_input=x)) == ["blocks.1.act"]


def test_one_pattern_as_a_string_is_refused():
    """A str is a sequence of one-letter patterns: exclude="blocks.0.act" excluded nothing, silently;
    names="relu" failed with "names ['r', 'e', 'l', 'u'] match no module"."""
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(TypeError, match="exclude must be a list of module-name patterns .* got 'blocks.0.act'"):
        insert_gates(Net(), exclude="blocks.0.act", example_input=x)
    with pytest.raises(TypeError, match="names must be a list of module-name patterns .* got 'relu'"):
        insert_gates(Net(), "relu", example_input=x)
    assert list(insert_gates(Net(), ("relu",), exclude=(), example_input=x)) == ["relu"]

def test_gated_model_starts_identical_and_remove_gates_restores():
    model = Net().eval()
    x = torch.rand(2, 3, 5, 5)
    before = model(x)
    insert_gates(model, example_input=x)
    assert torch.equal(model(x), before)
    remove_gates(model)
    assert gates_of(model) == {} and isinstance(model.blocks[0].act, nn.GELU)


def test_shared_activation_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu, self.fc = nn.Linear(3, 3), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.relu(self.b(self.relu(self.a(x)))))

    with pytest.raises(ValueError, match="runs 2 times"):
        insert_gates(Shared(), example_input=torch.rand(2, 3))


def test_a_refused_model_is_left_as_it_was():
    """A module that cannot carry a gate is found before any gate goes in: the error leaves no gate
    behind (the model was half gated, and a second try then said it had gates already)."""
    shared = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), shared, nn.Linear(4, 4), shared)
    with pytest.raises(ValueError, match="'3' runs 2 times"):
        insert_gates(model, ["1", "3"], example_input=torch.rand(2, 4))
    assert not gates_of(model) and type(model[1]) is nn.ReLU


def test_a_gated_transformer_activation_runs_in_eval_mode():
    """nn.TransformerEncoderLayer's fused inference path (eval, no autograd) runs its activation itself;
    the gate on an activation module given to it was skipped there, in evaluation and, with the
    weights frozen, in the scores' training too. The nested-tensor path of an encoder (padding mask)
    would give the gate a nested tensor; it is turned off."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=nn.ReLU(), batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    x, pad = torch.randn(2, 5, 8), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    gates = insert_gates(model, ["layers.*.activation"], example_input=x)
    model.eval()
    with torch.no_grad():
        for gate in gates.values():
            gate.scores.fill_(-1.0)  # every channel off: each layer's feed-forward adds its bias only
        got, got_padded = model(x), model(x, src_key_padding_mask=pad)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            want, want_padded = model(x), model(x, src_key_padding_mask=pad)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_padded, want_padded)
    assert not model.use_nested_tensor
    remove_gates(model)  # the plain model gets its nested-tensor path back (a speed matter only)
    assert model.use_nested_tensor and not any(m._forward_pre_hooks for m in model.modules())


def test_model_without_gateable_layer_is_refused():
    with pytest.raises(ValueError, match="no gateable layer"):
        insert_gates(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), example_input=torch.rand(2, 3))
    with pytest.raises(ValueError, match="example_input"):
        insert_gates(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_find_bottleneck():
    assert find_bottleneck(Net()) == "fc"
    assert find_bottleneck(Net(), "blocks") == "blocks"
    with pytest.raises(ValueError, match="not a module"):
        find_bottleneck(Net(), "head")
    with pytest.raises(ValueError, match="no nn.Linear"):
        find_bottleneck(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU()))


class HeadFirst(nn.Module):
    """A user MLP that registers its head before the feature layers."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.l1, self.a1 = nn.Linear(4, 8), nn.ReLU()
        self.l2, self.a2 = nn.Linear(8, 8), nn.ReLU()

    def forward(self, x):
        return self.fc(self.a2(self.l2(self.a1(self.l1(x)))))


def test_the_bottleneck_is_the_linear_that_runs_last():
    """The last registered nn.Linear was taken as the head: for a model registering its head first
    that was "l2", so "a2" (after it) stayed ungated and the auxiliary head read l2's input."""
    x = torch.rand(2, 4)
    assert find_bottleneck(HeadFirst(), example_input=x) == "fc"
    assert find_bottleneck(HeadFirst()) == "l2"  # without an input: the registration order (documented)
    assert list(insert_gates(HeadFirst(), example_input=x)) == ["a1", "a2"]
    unused = HeadFirst()
    unused.forward = lambda x: x  # the Linear modules are registered, none runs
    with pytest.raises(ValueError, match=r"none of its nn.Linear modules \(\['fc', 'l1', 'l2'\]\) runs"):
        find_bottleneck(unused, example_input=x)


def test_the_traces_leave_a_training_model_as_it_was():
    """insert_gates and find_bottleneck (run by extract before any step) trace a forward: in eval mode, so
    that a model in train mode keeps its BatchNorm statistics and its mode, and dropout draws nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(16, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 2, 6)
    rng = torch.get_rng_state()
    assert find_bottleneck(model, example_input=x) == "5"
    insert_gates(model, example_input=x)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_insert_gates_runs_the_model_once():
    """The head (the last Linear that runs) comes from the trace that reads the candidates' shapes."""
    model, calls = HeadFirst(), []
    model.register_forward_hook(lambda *_: calls.append(1))
    assert list(insert_gates(model, example_input=torch.rand(2, 4))) == ["a1", "a2"] and len(calls) == 1


def test_modes_and_straight_through_gradient():
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    gates = insert_gates(model, example_input=torch.rand(2, 3))
    gate = gates["1"]
    with torch.no_grad():
        gate.scores.copy_(torch.tensor([0.5, -0.1, 0.0, -2.0, 1.0]))
    gate.temperature = 0.5
    x = torch.rand(4, 3)
    h = torch.tanh(model[0](x))
    set_gate_mode(gates, "vanilla")
    assert torch.equal(model[1](model[0](x)), h)
    set_gate_mode(gates, "masked")
    y = model[1](model[0](x))
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert torch.equal(y, h * keep)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    sig = torch.sigmoid(gate.scores.detach() / 0.5)
    expected = (upstream * h.detach()).sum(0) * sig * (1 - sig) / 0.5
    torch.testing.assert_close(gate.scores.grad, expected)
    set_gate_mode(gates, "pruned")
    assert not gate.scores.requires_grad
    assert torch.equal(model[1](model[0](x)), y.detach())


def test_three_dimensional_outputs_gate_the_last_dim():
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    gates = insert_gates(model, example_input=torch.rand(2, 7, 4))
    assert gates["1"].num_channels == 6 and gates["1"].dim == 2


def test_gates_are_inserted_once():
    """A second insert_gates would wrap the Gated modules' activations again: two gates per channel, masks of
    twice the units, and a checkpoint that no longer loads into the model."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.rand(2, 3, 2, 2)
    insert_gates(model, example_input=x)
    with pytest.raises(ValueError, match="already has gates"):
        insert_gates(model, example_input=x)
    assert list(gates_of(model)) == ["2"] and type(model[2].activation) is nn.ReLU
