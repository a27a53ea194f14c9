"""Wall-clock of a small BISE extraction: cached (frozen prefix + bottleneck features) vs the
straightforward loop that recomputes everything (ExtractConfig.cache_features=False).

Schedule scaled from the paper's: 10 mask epochs with a halving after each (head refits after 9 of
them) and 5 head epochs per phase, i.e. the paper's 5:1 ratio of head epochs (500 + the skipped final
refit) to mask epochs (100). Data: colored-digits (1,258 training images, 3x8x8), single thread.
With --benchmark-disable: 1 mask epoch, 1 head epoch on 200 images (a smoke run).
"""

import dataclasses

import pytest
import torch

from bise.extract import ExtractConfig, extract
from bise.models import build_model

ARCHS = {"mlp": 1.0, "simple-cnn": 0.5}


@pytest.fixture(scope="module")
def digits():
    return pytest.importorskip("bise.data").load("colored-digits", seed=0)


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "straightforward"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_extract_wall_clock(benchmark, digits, arch, cache):
    benchmark.group = f"extract {arch}"
    data = digits
    config = ExtractConfig(mask_epochs=10, head_epochs=5, cache_features=cache)
    if benchmark.disabled:
        data = dataclasses.replace(digits, train=digits.train.subset(torch.arange(200)))
        config = dataclasses.replace(config, mask_epochs=1, head_epochs=1)
    torch.manual_seed(0)
    model = build_model(arch, data.num_classes, data.input_shape, width=ARCHS[arch]).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sub = benchmark.pedantic(extract, args=(model, data), kwargs={"config": config, "quiet": True},
                                 rounds=1 if benchmark.disabled else 3, iterations=1)
    finally:
        torch.set_num_threads(threads)
    assert sub.info["prefix_cached"] == cache
    benchmark.extra_info.update(units_kept=sub.units_kept, units_total=sub.units_total,
                                mask_epochs=config.mask_epochs, head_epochs=config.head_epochs,
                                train_images=len(data.train))
