"""Shared fixtures: the backends that public-API tests run on, and every backend kernel table to test."""

import types

import pytest

import bise_kernels
from bise_kernels import backends


def cpu_backends():
    return bise_kernels.available_backends("cpu")


@pytest.fixture(params=cpu_backends())
def backend(request):
    """Run the test once per backend available for CPU tensors (torch, cpp, triton interpreted)."""
    with bise_kernels.use_backend(request.param):
        yield request.param


def kernel_targets() -> list[tuple[str, str]]:
    """(backend, device type) for every backend but the reference, on every device it runs on here."""
    return [(name, device) for name, backend in backends.BACKENDS.items() if name != "torch"
            for device in backends.present_devices() if backend.runs_on(device)]


@pytest.fixture(params=kernel_targets(), ids=lambda target: f"{target[0]}-{target[1]}")
def kernels(request):
    """One backend's kernels (attributes named as in backends/reference.py), ``.name`` and ``.device``."""
    name, device = request.param
    return types.SimpleNamespace(name=name, device=device, **backends.kernel_table(name))
