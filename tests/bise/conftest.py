"""Shared fixtures of the bise tests."""

import pytest
import torch

from bise import data


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models on a shared 2-core machine run far faster on one thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A data cache of the test module's own (never the user's)."""
    return str(tmp_path_factory.mktemp("bise_cache"))


@pytest.fixture(scope="module")
def digits(cache_dir):
    """The small built-in colored-digits benchmark, seed 0."""
    return data.load("colored-digits", seed=0, cache_dir=cache_dir)
