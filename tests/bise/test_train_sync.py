"""No host synchronisation inside an epoch: vanilla training, head phases, mask epochs, evaluation.

On the CPU every read of a tensor value is counted (a dispatcher mode sees ``_local_scalar_dense``
and the ops whose output shape depends on the data; ``Tensor.cpu/tolist/numpy`` are counted by
patching) and the count must not grow with the number of steps in an epoch. Two CPU-only reads
are given their GPU behaviour first: the gates' finiteness check (an ``_assert_async`` on a
GPU) and ``F.one_hot``'s range check (skipped on a GPU). On a GPU the step loops run under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import bise_kernels._checks as kernel_checks
from bise.data.types import BiasedDataset, Split
from bise.extract import ExtractConfig, _Run, extract
from bise.models import build_model
from bise.recipes import RECIPES
from bise.train import fit, train_steps

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.is_nonzero.default, aten.equal.default, aten._unique2.default, aten.unique_dim.default,
            aten.unique_consecutive.default,
            aten.lift_fresh.default}  # torch.tensor(host data): a blocking host-to-device copy on a GPU
HOST_METHODS = ("cpu", "tolist", "numpy")
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class SyncCounter(TorchDispatchMode):
    """Counts the ops that read device values on the host (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNC_OPS:
            self.counts[str(func)] += 1
        elif func in INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                       for i in (args[1] if len(args) > 1 else ())):
            self.counts[f"{func} (bool index)"] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@pytest.fixture
def count_syncs(monkeypatch):
    """A function running ``fn`` under a SyncCounter; returns (result, counter)."""
    def device_check_finite(t, name):
        torch._assert_async(torch.isfinite(t).all(), f"{name} contains non-finite values (NaN or inf)")

    def device_one_hot(t, num_classes=-1):
        return (t[..., None] == torch.arange(num_classes, device=t.device)).long()

    monkeypatch.setattr(kernel_checks, "check_finite", device_check_finite)
    monkeypatch.setattr(F, "one_hot", device_one_hot)

    def run(fn, *args, **kwargs):
        counter, originals = SyncCounter(), {n: getattr(torch.Tensor, n) for n in HOST_METHODS}

        def counting(name):
            def method(self, *a, **k):
                counter.counts[f"Tensor.{name}"] += 1
                return originals[name](self, *a, **k)
            return method

        for name in HOST_METHODS:
            setattr(torch.Tensor, name, counting(name))
        try:
            with counter:
                result = fn(*args, **kwargs)
        finally:
            for name, method in originals.items():
                setattr(torch.Tensor, name, method)
        return result, counter

    return run


def _data(n=240, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(m):
        y = torch.randint(0, classes, (m,), generator=g)
        b = torch.where(torch.rand(m, generator=g) < 0.8, y, torch.randint(0, classes, (m,), generator=g))
        x = torch.randint(0, 256, (m, 3, 8, 8), generator=g, dtype=torch.uint8)
        x[:, 0] = (y * 60).to(torch.uint8)[:, None, None]
        return Split(x, y, b)

    return BiasedDataset("random", split(n), split(n // 2), split(n // 2), classes, classes, 1, 0.8,
                         "symmetric-rho", "random")


@pytest.mark.parametrize("arch", ["mlp", "simple-cnn"])
def test_vanilla_epoch_reads_the_device_twice_whatever_the_step_count(count_syncs, arch):
    data = _data()
    counts = []
    for batch_size in (12, 60):  # 20 and 4 steps an epoch
        torch.manual_seed(0)
        model = build_model(arch, 3, data.input_shape, width=0.25)
        _, counter = count_syncs(fit, model, data.train, dict(RECIPES["simple-cnn"], milestones=[1]),
                                 epochs=2, batch_size=batch_size, lr=0.01, quiet=True)
        counts.append(counter.counts)
    assert counts[0] == counts[1], counts
    assert counts[0] == Counter({str(aten._local_scalar_dense.default): 4}), counts[0]  # loss + accuracy, 2 epochs


def test_extraction_syncs_do_not_grow_with_steps(count_syncs, monkeypatch):
    """Mask epochs, head phases (both loops) and the per-epoch evaluation: same reads at 4x the steps.

    The reuse of frozen passes while the masks are unchanged (``_Run.frozen``) is turned off: the
    two runs change their masks at different epochs, which would skip different passes.
    """
    monkeypatch.setattr(_Run, "frozen", lambda self, name, compute: compute())
    data = _data()
    torch.manual_seed(0)
    model = build_model("simple-cnn", 3, data.input_shape, width=0.25).eval()
    for cache in (True, False):
        counts = []
        for batch_size, eval_batch in ((15, 20), (60, 120)):
            config = ExtractConfig(mask_epochs=3, head_epochs=2, batch_size=batch_size, eval_batch_size=eval_batch,
                                   tau_stop=0.2, cache_features=cache)
            sub, counter = count_syncs(extract, model, data, config=config, quiet=True)
            counts.append(counter.counts)
            assert sub.info["prefix_cached"] == cache
        assert counts[0] == counts[1], (cache, counts)


def test_mask_epoch_alone_reads_once(count_syncs, monkeypatch):
    """The steps of a mask epoch read nothing; the epoch reads its four loss sums once."""
    data = _data()
    torch.manual_seed(0)
    model = build_model("simple-cnn", 3, data.input_shape, width=0.25).eval()
    seen = []
    steps = _Run.mask_steps

    def counted_steps(self):
        totals, counter = count_syncs(steps, self)
        seen.append(counter.total)
        return totals

    monkeypatch.setattr(_Run, "mask_steps", counted_steps)
    extract(model, data, config=ExtractConfig(mask_epochs=2, head_epochs=1, batch_size=20, tau_stop=0.3),
            quiet=True)
    assert seen == [0, 0]


def test_the_counter_sees_the_syncs_it_is_meant_to(count_syncs):
    """The counter is not blind: .item(), bool(), boolean indexing and .tolist() are each seen."""
    t = torch.arange(6.0)
    _, counter = count_syncs(lambda: (t.sum().item(), bool(t[0] > 1), t[t > 2], t.tolist()))
    assert counter.counts[str(aten._local_scalar_dense.default)] == 2
    assert counter.total >= 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_no_sync_in_the_gpu_step_loops(monkeypatch):
    """torch.cuda.set_sync_debug_mode('error') over whole epochs of the vanilla and mask steps."""
    from bise.batching import DeviceSplit

    data = _data(n=600)
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model("simple-cnn", 3, data.input_shape, width=0.5).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    split = DeviceSplit(data.train, device)
    gen = torch.Generator().manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            train_steps(model, split, opt, gen, 100, lambda logits, idx: F.cross_entropy(logits, split.y[idx]))
    finally:
        torch.cuda.set_sync_debug_mode("default")

    steps = _Run.mask_steps

    def strict_steps(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return steps(self)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(_Run, "mask_steps", strict_steps)
    extract(model.eval(), data, config=ExtractConfig(mask_epochs=2, head_epochs=1, batch_size=100, tau_stop=0.3,
                                                     device="cuda"), quiet=True)
