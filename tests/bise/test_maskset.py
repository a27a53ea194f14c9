"""The mask-set protocol: the second draw of the training set (bise.data.maskset) and its use in
extraction (ExtractConfig.mask_set, recorded in the result)."""

import numpy as np
import pytest
import torch

from bise import data
from bise.extract import ExtractConfig, extract
from bise.train import train_vanilla


def test_second_draw_has_the_same_images_and_a_fresh_bias_assignment(digits):
    view, protocol = data.mask_data(digits)
    assert protocol == "fresh-draw" == data.default_protocol(digits)
    a, b = digits.train, view.train
    assert torch.equal(a.src, b.src) and torch.equal(a.y, b.y)  # same source images, same order
    conflicting = ~a.aligned() | ~b.aligned()
    assert int(conflicting.sum()) > 0 and not torch.equal(a.b, b.b)  # a fresh bias assignment
    assert not torch.equal(a.aligned(), b.aligned())  # other samples conflict
    assert float(b.aligned().float().mean()) == pytest.approx(float(a.aligned().float().mean()))  # same rho
    assert not torch.equal(a.x, b.x)  # rendered afresh
    assert view.val is digits.val and view.test is digits.test and view.info["mask_set"] == "fresh-draw"


def test_second_draw_is_deterministic_per_seed(digits, tmp_path):
    again = data.load("colored-digits", seed=0, cache_dir=str(tmp_path))  # built from scratch
    first, second = data.mask_data(digits)[0].train, data.mask_data(again)[0].train
    assert torch.equal(first.x, second.x) and torch.equal(first.b, second.b)
    other = data.mask_data(data.load("colored-digits", seed=1, cache_dir=str(tmp_path)))[0].train
    assert not torch.equal(first.b, other.b)


def test_vanilla_train_protocol_is_the_data_itself(digits):
    assert data.mask_data(digits, "vanilla-train") == (digits, "vanilla-train")
    with pytest.raises(ValueError, match="mask_set must be one of"):
        data.mask_data(digits, "second")


def _npz(path, rng, mask=False):
    def split(n):
        y = rng.integers(0, 2, n)
        return rng.integers(0, 255, (n, 6, 6, 3), dtype=np.uint8), y, np.where(rng.random(n) < 0.9, y, 1 - y)
    arrays = {}
    for name, n in (("train", 40), ("test", 20)) + ((("mask", 40),) if mask else ()):
        arrays.update(zip((f"{name}_x", f"{name}_y", f"{name}_b"), split(n)))
    np.savez(path, **arrays)
    return path


def test_fixed_user_data_defaults_to_vanilla_train_and_refuses_fresh_draw(tmp_path):
    ds = data.load(str(_npz(tmp_path / "fixed.npz", np.random.default_rng(0))))
    assert data.default_protocol(ds) == "vanilla-train" and ds.mask_train is None
    with pytest.raises(ValueError, match="no generator"):
        data.mask_data(ds, "fresh-draw")


def test_user_npz_may_supply_its_second_draw(tmp_path):
    ds = data.load(str(_npz(tmp_path / "drawn.npz", np.random.default_rng(1), mask=True)))
    view, protocol = data.mask_data(ds)
    assert protocol == "fresh-draw" and view.train is ds.mask_train and len(view.train) == 40
    assert "mask" not in ds.info["sizes"]


def test_extraction_records_the_protocol(digits):
    model = train_vanilla(digits, "mlp", epochs=3, quiet=True)
    tiny = dict(mask_epochs=1, head_epochs=1)
    assert extract(model, digits, config=ExtractConfig(**tiny), quiet=True).info["mask_set"] == "fresh-draw"
    sub = extract(model, digits, config=ExtractConfig(**tiny, mask_set="vanilla-train"), quiet=True)
    assert sub.info["mask_set"] == "vanilla-train"
    with pytest.raises(ValueError, match="mask_set"):
        ExtractConfig(mask_set="other").validate()


def test_the_second_draw_is_kept_and_checked(digits):
    """mask_data keeps the draw in data.mask_train (generated once); "" is no protocol; a hand-made draw of
    other image or bias shapes is refused."""
    import dataclasses
    fresh = dataclasses.replace(digits, mask_train=None, info=dict(digits.info))
    view, _ = data.mask_data(fresh)
    assert fresh.mask_train is view.train and data.mask_data(fresh)[0].train is view.train
    with pytest.raises(ValueError, match="mask_set must be one of"):
        data.mask_data(digits, "")
    t = digits.train
    odd = dataclasses.replace(digits, mask_train=data.Split(t.x[:, :, :4], t.y, t.b))
    with pytest.raises(ValueError, match="the second draw's images / bias labels .* do not match"):
        data.mask_data(odd, "fresh-draw")
