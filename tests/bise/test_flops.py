"""MAC counts (the paper's 414.9 M for SimpleConvNet on 3x28x28), parameter counts, latency."""

import pytest
import torch
from torch import nn

from bise.flops import count_macs, count_params, measure_latency



def _simple_cnn():
    """The paper's BiasedMNIST net, inline: 4 x [conv 7x7 pad 3, BN, act] 16/32/64/128, GAP, fc."""
    layers, cin = [], 3
    for width, act in zip((16, 32, 64, 128), (nn.ReLU, nn.ReLU, nn.ReLU, nn.Tanh)):
        layers += [nn.Conv2d(cin, width, 7, padding=3), nn.BatchNorm2d(width), act()]
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def test_simple_cnn_macs_match_paper():
    assert count_macs(_simple_cnn(), (3, 28, 28)) == pytest.approx(414.9, abs=0.05)
    from bise.models import build_model
    assert count_macs(build_model("simple-cnn", 10, (3, 28, 28)), (3, 28, 28)) == pytest.approx(414.9, abs=0.05)


def test_mlp_macs_and_params_by_hand():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(2352, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                        nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    assert count_macs(mlp, (3, 28, 28)) == pytest.approx((2352 * 100 + 2 * 100 * 100 + 100 * 10) / 1e6)
    assert count_params(mlp) == 2352 * 100 + 100 + 2 * (100 * 100 + 100) + 100 * 10 + 10
    assert count_params(nn.BatchNorm2d(4)) == 8  # running statistics are buffers, not parameters


def test_latency_and_bad_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).train()
    state = torch.get_rng_state()
    t = measure_latency(model, (3, 2, 2), batch_size=4, repeats=3)
    assert 0 < t < 1 and model.training
    assert torch.equal(torch.get_rng_state(), state)  # its random batch drew from the caller's RNG
    with pytest.raises(ValueError, match="batch_size"):
        measure_latency(model, (3, 2, 2), batch_size=0)
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(model, (3, 0, 2))
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(model, (True, 2, 2))  # a bool is an int to Python, not a size


class _SDPA(nn.Module):
    def forward(self, x):
        q = x.view(1, 2, 17, 8)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_attention_is_counted():
    """In eval mode nn.MultiheadAttention takes its fast path and scaled_dot_product_attention a fused CPU
    kernel, which FlopCounterMode counted as 0: an encoder layer was 0 MACs, a ViT only its MLPs."""
    d, heads, ff, tokens = 16, 2, 64, 17
    linears = tokens * (4 * d * d + 2 * d * ff)  # q, k, v, out projections and the MLP
    attention = 2 * tokens * tokens * d  # q k^T and attn v, over all heads
    enc = nn.TransformerEncoderLayer(d, heads, ff, batch_first=True)
    assert count_macs(enc, (tokens, d)) * 1e6 == pytest.approx(linears + attention, rel=1e-12)
    assert count_macs(_SDPA(), (tokens, d)) * 1e6 == pytest.approx(2 * 2 * tokens * tokens * 8, rel=1e-12)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_counting_leaves_a_training_model_in_training_mode():
    """count_macs / measure_latency run in eval mode and give the model back as it was: a model left in eval
    mode would train on with frozen BatchNorm statistics and no dropout."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout()).train()
    count_macs(model, (3, 8, 8))
    assert all(m.training for m in model.modules())
    measure_latency(model, (3, 8, 8), repeats=1, warmup=0)
    assert all(m.training for m in model.modules())
    count_macs(model.eval(), (3, 8, 8))
    assert not any(m.training for m in model.modules())


def test_latency_runs_on_the_device_asked_for():
    """measure_latency moves the model and its batch to ``device`` (meta stands in for a GPU) and the model
    back afterwards."""
    seen, moves = [], []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            seen.append(x.device.type)
            return x

        def to(self, device):  # meta parameters cannot be copied back: record the moves only
            moves.append(torch.device(device).type)
            return self

    measure_latency(Probe(), (2,), device="meta", repeats=2, warmup=1)
    assert seen == ["meta"] * 3 and moves == ["meta", "cpu"]
