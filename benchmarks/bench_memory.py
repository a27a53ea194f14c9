"""Extra state per masked weight kept for backward, per backend (target 10 of docs/prior-art.md).

Counts the bytes of tensors autograd saves during a masked forward that are not the layer's own
parameters, scores or input: the memory a masked layer costs beyond a dense one. Recorded in
the benchmark's extra_info (``extra_bytes_per_weight``); the benchmark also asserts the bound of
at most 1 byte per weight so a regression cannot pass silently.
"""

import pytest
import torch

import bise_kernels as bk


def _saved_extra_bytes(layer: torch.nn.Module, x: torch.Tensor) -> int:
    own = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {x.untyped_storage().data_ptr()}
    extra = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            extra.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    return sum(extra)


@pytest.mark.parametrize("backend", bk.available_backends("cpu"))
@pytest.mark.parametrize("granularity", ["weight", "channel"])
def test_extra_bytes_per_weight(benchmark, backend, granularity):
    n = 256 if benchmark.disabled else 1024
    layer = bk.MaskedLinear(n, n, granularity=granularity, density=0.5)
    x = torch.randn(64, n, requires_grad=True)
    with bk.use_backend(backend):
        extra = _saved_extra_bytes(layer, x)
        benchmark.pedantic(lambda: layer(x).sum().backward(), rounds=3, warmup_rounds=1)
    per_weight = extra / layer.weight.numel()
    benchmark.extra_info.update(extra_bytes_per_weight=per_weight, weights=layer.weight.numel(), backend=backend)
    assert per_weight <= 1.0
