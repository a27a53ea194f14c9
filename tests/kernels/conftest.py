"""Shared fixture: the CPU backends that public-API tests run on."""

import pytest

import bise_kernels


def cpu_backends():
    return bise_kernels.available_backends("cpu")


@pytest.fixture(params=cpu_backends())
def backend(request):
    """Run the test once per backend available for CPU tensors (torch, cpp, triton interpreted)."""
    with bise_kernels.use_backend(request.param):
        yield request.param

