"""Shared fixtures of the bise tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models on a shared 2-core machine run far faster on one thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
