"""bise.data on the user's own data: npz, image folder + metadata.csv, CelebA and Waterbirds
layouts (tiny synthetic copies written here), and every malformed variant's message."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bise.data as data
from bise import validate
from bise.losses import weight_table


def _npz_arrays(n=(12, 6, 8), hw=4, c=3, k=3, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for s, m in zip(("train", "val", "test"), n):
        out[f"{s}_x"] = rng.integers(0, 256, (m, hw, hw, c), dtype=np.uint8)
        out[f"{s}_y"] = np.arange(m, dtype=np.int64) % k
        out[f"{s}_b"] = (np.arange(m, dtype=np.int64) // 2) % k
    return out


def test_npz_loads_channels_first_with_inferred_counts(tmp_path):
    arrays = _npz_arrays()
    np.savez(tmp_path / "mine.npz", **arrays)
    ds = data.load(str(tmp_path / "mine.npz"))
    assert ds.name == "mine" and ds.input_shape == (3, 4, 4)
    assert (ds.num_classes, ds.num_bias_classes, ds.num_biases) == (3, 3, 1)
    assert ds.weighting == "group-balanced" and ds.rho is None
    assert torch.equal(ds.train.x, torch.from_numpy(arrays["train_x"]).permute(0, 3, 1, 2))
    assert torch.equal(ds.val.y, torch.from_numpy(arrays["val_y"]))
    assert ds.info["sizes"] == {"train": 12, "val": 6, "test": 8}


def test_npz_without_val_grey_two_bias_and_options(tmp_path):
    arrays = {k: v for k, v in _npz_arrays(c=1, k=4).items() if not k.startswith("val")}
    arrays["train_x"] = arrays["train_x"][..., 0]  # (N, H, W) is read as grey
    for s in ("train", "test"):
        arrays[f"{s}_b"] = np.stack([arrays[f"{s}_b"], arrays[f"{s}_y"]], axis=1)
    np.savez(tmp_path / "two.npz", **arrays)
    ds = data.load(f"npz:{tmp_path / 'two.npz'},num_classes=4,weighting=two-bias,rho_l=0.9,rho_r=0.8")
    assert ds.val is None and ds.input_shape == (1, 4, 4)
    assert ds.num_biases == 2 and ds.train.aligned().shape == (12, 2)
    assert (ds.num_classes, ds.weighting, ds.rho) == (4, "two-bias", (0.9, 0.8))
    assert ds.info["rho_realised"][1] == 1.0
    # without rho_l / rho_r the weighting takes the training split's fractions, which must lie in (0, 1)
    # (it took Multi-Color MNIST's (0.99, 0.95) without a word); a scalar rho is no pair
    degenerate = data.load(str(tmp_path / "two.npz"))  # the right bias never conflicts: no pair to weight by
    assert degenerate.rho is None and "rho_from" not in degenerate.info
    with pytest.raises(ValueError, match=r"'two-bias' needs rho=\(rho_left, rho_right\), and the training split's "
                                         r"aligned fractions \[0.\d+, 1.0\] cannot serve .*give rho_l= and rho_r="):
        validate.two_bias_rho(degenerate, degenerate.weighting)
    with pytest.raises(ValueError, match=r"two-bias weighting needs rho=\(rho_left, rho_right\), got None"):
        weight_table("two-bias")  # no silent Multi-Color MNIST default
    with pytest.raises(ValueError, match="rho=0.9: two bias labels a sample take rho_l= and rho_r="):
        data.load(f"npz:{tmp_path / 'two.npz'},rho=0.9")
    with pytest.raises(ValueError, match="rho_l and rho_r go together"):
        data.load(f"npz:{tmp_path / 'two.npz'},rho_l=0.9")
    np.savez(tmp_path / "one.npz", **_npz_arrays())
    with pytest.raises(ValueError, match=r"rho_l, rho_r = \(0.9, 0.8\): these data have one bias label"):
        data.load(f"npz:{tmp_path / 'one.npz'},rho_l=0.9,rho_r=0.8")
    arrays["train_b"][0, 1] = (arrays["train_y"][0] + 1) % 4  # one conflicting sample on the right
    np.savez(tmp_path / "two.npz", **arrays)
    # two bias labels a sample get the two-bias weighting by default (group-balanced loaded, then the
    # extraction refused it after the vanilla training); a weighting of the other arity is refused here
    ds = data.load(str(tmp_path / "two.npz"))
    assert ds.weighting == "two-bias" and ds.rho[1] == 11 / 12  # unrounded (info's rho_realised has 6 digits)
    assert ds.info["rho_realised"] == [round(r, 6) for r in ds.rho]
    assert ds.info["rho_from"] == "rho_realised"
    with pytest.raises(ValueError, match="weighting=group-balanced: takes one bias label a sample; these data have two"):
        data.load(f"npz:{tmp_path / 'two.npz'},weighting=group-balanced")
    with pytest.raises(ValueError, match=r"weighting=two-bias: needs two bias labels a sample \(b of shape \(N, 2\)\)"):
        data.load(f"npz:{tmp_path / 'one.npz'},weighting=two-bias")


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.pop("train_b"), "missing key 'train_b'"),
    (lambda a: a.pop("val_y"), "missing key 'val_y'"),
    (lambda a: a.update(train_x=a["train_x"].astype(np.float32)), "train_x: images must be uint8"),
    (lambda a: a.update(test_x=a["test_x"][..., :2]), "C in {1, 3}"),
    (lambda a: a.update(train_y=a["train_y"].astype(np.float64)), "train_y: labels must be integers"),
    (lambda a: a["train_y"].__setitem__(5, -1), "train_y[5] = -1: labels must be >= 0"),
    # uint64 past int64 wrapped to a negative label, loaded without a word
    (lambda a: a.update(train_b=np.where(np.arange(12) == 3, np.uint64(2**64 - 1), a["train_b"].astype(np.uint64))),
     "train_b[3] = 18446744073709551615: labels must fit int64"),
    (lambda a: a.update(test_b=a["test_b"][:-1]), "test_b: 7 labels but 8 images"),
    (lambda a: a.update(val_x=a["val_x"][:0], val_y=a["val_y"][:0], val_b=a["val_b"][:0]),
     "val: the split is empty"),
    (lambda a: a.update(test_x=a["test_x"][:, :2]), "splits disagree on image shape"),
    (lambda a: a.update(train_x=np.array([None] * 12, dtype=object)), "key 'train_x' is not a plain"),
    # three biases, or one in a column, loaded and trained, then bise.evaluate refused them: refused here now
    (lambda a: a.update(**{f"{s}_b": np.stack([a[f"{s}_b"]] * 3, axis=1) for s in ("train", "val", "test")}),
     "train_b: expected shape (N,) or (N, 2) for two biases, got (12, 3)"),
    (lambda a: a.update(**{f"{s}_b": a[f"{s}_b"][:, None] for s in ("train", "val", "test")}),
     "train_b: expected shape (N,) or (N, 2) for two biases, got (12, 1)"),
])
def test_malformed_npz_fails_with_its_message(tmp_path, edit, message):
    arrays = _npz_arrays()
    edit(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError) as e:
        data.load(str(tmp_path / "bad.npz"))
    assert message in str(e.value)


def test_npz_labels_out_of_range_for_given_num_classes(tmp_path):
    np.savez(tmp_path / "d.npz", **_npz_arrays(k=3))
    with pytest.raises(ValueError, match=r"train_y\[2\] = 2: out of range for num_classes=2"):
        data.load(f"npz:{tmp_path / 'd.npz'},num_classes=2")
    with pytest.raises(ValueError, match="needs rho"):
        data.load(f"npz:{tmp_path / 'd.npz'},weighting=symmetric-rho")
    with pytest.raises(ValueError, match="unknown option"):
        data.load(f"npz:{tmp_path / 'd.npz'},size=3")


def test_npz_keys_bise_does_not_read_are_named(tmp_path):
    arrays = {("valid" + k[3:] if k.startswith("val_") else k): v for k, v in _npz_arrays().items()}
    np.savez(tmp_path / "d.npz", **arrays, classes=np.arange(2))
    with pytest.warns(UserWarning, match=r"keys \['classes', 'valid_b', 'valid_x', 'valid_y'\] are not read"):
        ds = data.load(str(tmp_path / "d.npz"))
    assert ds.val is None


def test_a_class_without_training_samples_is_named(tmp_path):
    """num_classes is max label + 1 over every split, so a class missing from train (here class 2, in
    val and test) gave a head whose class 2 was never learnt: its test samples were errors, silently."""
    arrays = _npz_arrays(k=3)
    keep = arrays["train_y"] != 2
    arrays.update(train_x=arrays["train_x"][keep], train_y=arrays["train_y"][keep], train_b=arrays["train_b"][keep])
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match=r"d: the train split has no sample of class\(es\) \[2\] of num_classes=3 "
                                         r"\(class 2 in val and test\): a class without training samples is never "
                                         "learnt"):
        data.load(str(tmp_path / "d.npz"))
    np.savez(tmp_path / "e.npz", **_npz_arrays(k=3))
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] of num_classes=4 \(class 3 in no split\)"):
        data.load(f"npz:{tmp_path / 'e.npz'},num_classes=4")
    # a stray label of 10**9: the first missing classes and their count, without a list of a billion of them
    huge = _npz_arrays(k=3)
    huge["test_y"][0] = 10**9
    np.savez(tmp_path / "h.npz", **huge)
    with pytest.raises(ValueError, match=r"class\(es\) \[3, 4, 5, 6, 7\] \.\.\. \(999999998 in all\) of "
                                         r"num_classes=1000000001 \(class 3 in no split"):
        data.load(str(tmp_path / "h.npz"))
    with pytest.raises(ValueError, match=r"n_train=5 leaves class\(es\) \[.*\] of 10 without a training sample"):
        data.load("colored-digits:n_train=5", cache_dir=str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").glob("*.npz"))


def test_unreadable_npz_and_missing_paths(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable .npz"):
        data.load(str(tmp_path / "junk.npz"))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        data.load(str(tmp_path / "absent.npz"))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        data.load(f"celeba:{tmp_path / 'absent'}")


# --- image folder + metadata.csv ------------------------------------------------------------

def _write_png(path, value, mode="RGB", size=4):
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = {"RGB": (value, 255 - value, value // 2), "LA": (value, 128)}.get(mode, value)
    Image.new(mode, (size, size), colour).save(path)


def _folder(root, rows, mode="RGB"):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "y", "b", "split", "note"])
        for i, (y, b, split) in enumerate(rows):
            name = f"img/{split}_{i}.png"
            _write_png(root / name, 20 * i % 256, mode)
            w.writerow([name, y, b, split, "extra column"])
    return root


ROWS = [(0, 0, "train"), (1, 1, "train"), (1, 0, "train"), (0, 0, "val"), (1, 1, "val"),
        (0, 1, "test"), (1, 1, "test"), (1, 0, "test")]


def test_image_folder_loads_and_is_cached(tmp_path):
    root = _folder(tmp_path / "faces", ROWS)
    ds = data.load(str(root), cache_dir=str(tmp_path / "cache"))
    assert ds.name == "faces" and ds.input_shape == (3, 4, 4)
    assert ds.info["sizes"] == {"train": 3, "val": 2, "test": 3} and ds.num_classes == 2
    assert torch.equal(ds.test.y, torch.tensor([0, 1, 1])) and torch.equal(ds.train.b, torch.tensor([0, 1, 0]))
    assert tuple(ds.train.x[0, :, 0, 0].tolist()) == (0, 255, 0)
    again = data.load(f"folder:{root}", cache_dir=str(tmp_path / "cache"))
    assert again.info["cache_hit"] and torch.equal(again.train.x, ds.train.x)
    small = data.load(f"folder:{root},size=2", cache_dir=str(tmp_path / "cache"))
    assert small.input_shape == (3, 2, 2) and not small.info["cache_hit"]


def test_an_image_with_an_exif_orientation_is_read_upright(tmp_path):
    """A photo stored sideways with an EXIF Orientation tag (as a phone writes its JPEGs) was read sideways: it
    is turned as a viewer shows it (PIL.ImageOps.exif_transpose)."""
    root = _folder(tmp_path / "photos", ROWS)
    upright = Image.new("RGB", (4, 4))
    upright.putpixel((3, 0), (255, 128, 0))  # top right
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # turned left; orientation 6: turn right to view it
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(root / "img" / "train_0.png", exif=exif)
    ds = data.load(str(root), cache_dir=str(tmp_path / "cache"))
    assert ds.train.x[0].permute(1, 2, 0).tolist() == np.asarray(upright).tolist()


@pytest.mark.parametrize("mode", ["L", "LA"])
def test_grey_image_folder_has_one_channel(tmp_path, mode):
    """Grey PNGs, with or without alpha (which is dropped, as RGBA's), read as one channel of the grey values."""
    ds = data.load(str(_folder(tmp_path / "g", ROWS, mode=mode)), cache_dir=str(tmp_path / "c"))
    assert ds.input_shape == (1, 4, 4)
    assert sorted(set(ds.train.x.flatten().tolist())) == [0, 20, 40]


def _break_csv(root, line, column, value):
    rows = list(csv.reader(open(root / "metadata.csv")))
    rows[line - 1][rows[0].index(column)] = value
    csv.writer(open(root / "metadata.csv", "w", newline="")).writerows(rows)


@pytest.mark.parametrize("damage, error, message", [
    (lambda r: _break_csv(r, 4, "y", "cat"), ValueError, "metadata.csv line 4: y='cat' is not a non-negative integer"),
    (lambda r: _break_csv(r, 3, "b", "-2"), ValueError, "line 3: b='-2'"),
    (lambda r: _break_csv(r, 2, "split", "dev"), ValueError, "line 2: split='dev' is not one of"),
    (lambda r: [_break_csv(r, line, "split", "val") for line in (7, 8, 9)], ValueError,
     "no rows with split=test"),
    (lambda r: (r / "img" / "train_1.png").unlink(), FileNotFoundError, "train_1.png"),
    (lambda r: (r / "img" / "train_2.png").write_bytes(b"not a png"), ValueError, "cannot read image"),
    (lambda r: _write_png(r / "img" / "test_6.png", 9, size=5), ValueError, "pass size=N"),
    # 16-bit grey / float pixels were clipped to 0..255 by Pillow's convert("L"): a 16-bit PNG read as
    # nearly all 255, a float TIFF in [0, 1] as all 0, silently
    (lambda r: Image.fromarray(np.full((4, 4), 1000, np.uint16)).save(r / "img" / "train_1.png"), ValueError,
     "train_1.png: mode I;16 (16-bit) pixels are not read"),
    (lambda r: Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(r / "img" / "t.tiff") or
     _break_csv(r, 3, "filename", "img/t.tiff"), ValueError, "t.tiff: mode F (32-bit float) pixels are not read"),
    (lambda r: (r / "metadata.csv").write_text("file,y,b,split\na.png,0,0,train\n"), ValueError,
     "missing column 'filename'"),
    (lambda r: (r / "metadata.csv").write_text("filename,y,b,split\n"), ValueError, "no data rows"),
    (lambda r: (r / "metadata.csv").unlink(), FileNotFoundError, "metadata.csv"),
    # a cp1252 export (an accented name): a bare UnicodeDecodeError named neither file nor line
    (lambda r: (r / "metadata.csv").write_bytes((r / "metadata.csv").read_bytes().replace(b"test_7", b"t\xe9st_7")),
     ValueError, "metadata.csv line 9: byte 0xe9 is not UTF-8; save the file as UTF-8"),
])
def test_malformed_image_folder_fails_with_its_message(tmp_path, damage, error, message):
    root = _folder(tmp_path / "d", ROWS)
    damage(root)
    with pytest.raises(error) as e:
        data.load(f"folder:{root}", cache_dir=str(tmp_path / "cache"))
    assert message in str(e.value)
    assert not list((tmp_path / "cache").glob("*"))  # nothing partially cached


def test_metadata_with_a_byte_order_mark_loads(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: its first column was '\ufefffilename', "missing"."""
    root = _folder(tmp_path / "bom", ROWS)
    plain = data.load(f"folder:{root}", cache_dir=str(tmp_path / "c1"))
    (root / "metadata.csv").write_bytes(b"\xef\xbb\xbf" + (root / "metadata.csv").read_bytes())
    bom = data.load(f"folder:{root}", cache_dir=str(tmp_path / "c2"))
    assert torch.equal(bom.train.x, plain.train.x) and torch.equal(bom.test.y, plain.test.y)


def test_unreadable_metadata_and_oversized_images_name_the_file(tmp_path, monkeypatch):
    """A metadata.csv without read permission was a PermissionError traceback from the format
    detection (the CLI called an unreadable CelebA list "the data cache"); an image over Pillow's
    decompression-bomb limit a DecompressionBombError naming no file."""
    root = _folder(tmp_path / "d", ROWS)
    read_bytes = Path.read_bytes

    def denied(path):
        if path.name == "metadata.csv":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    with monkeypatch.context() as m:
        m.setattr(Path, "read_bytes", denied)
        with pytest.raises(ValueError, match=r"cannot read .*metadata.csv: Permission denied"):
            data.load(str(root), cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)  # 4x4 images: twice the limit is a bomb
    with pytest.raises(ValueError, match=r"cannot read image .*\.png: Image size \(16 pixels\) exceeds limit"):
        data.load(str(root), cache_dir=str(tmp_path / "cache"))


# --- CelebA ---------------------------------------------------------------------------------

ATTRS = ["5_o_Clock_Shadow", "Blond_Hair", "Male"]
# (blond, male) -> count per partition; blond is mostly female, so b = not Male
CELEBA_GROUPS = {0: {(1, 0): 12, (1, 1): 5, (0, 0): 15, (0, 1): 20},
                 1: {(1, 0): 4, (1, 1): 2, (0, 0): 5, (0, 1): 6},
                 2: {(1, 0): 1, (1, 1): 1, (0, 0): 1, (0, 1): 1}}


def _celeba(root, groups=CELEBA_GROUPS, blank_line=False, lossless=False):
    """A CelebA layout with {partition: {(blond, male): count}}; image blue channel = running index (exact with
    ``lossless``: PNG bytes under the .jpg names); ``blank_line``: a trailing blank line in the attribute file."""
    (root / "img_align_celeba").mkdir(parents=True)
    attr, part, i = [], [], 0
    for p, gs in groups.items():
        for (blond, male), n in gs.items():
            for _ in range(n):
                i += 1
                name = f"{i:06d}.jpg"
                Image.new("RGB", (4, 5), (blond * 200, male * 200, i % 256)).save(
                    root / "img_align_celeba" / name, format="PNG" if lossless else None)
                vals = [("1" if i % 3 else "-1"), ("1" if blond else "-1"), ("1" if male else "-1")]
                attr.append(f"{name} " + " ".join(f"{v:>2}" for v in vals))
                part.append(f"{name} {p}")
    (root / "list_attr_celeba.txt").write_text(f"{i}\n" + " ".join(ATTRS) + "\n" + "\n".join(attr) + "\n"
                                               + ("\n" if blank_line else ""))
    (root / "list_eval_partition.txt").write_text("\n".join(part) + "\n")
    return root


def test_celeba_follows_the_paper_protocol(tmp_path):
    root = _celeba(tmp_path / "celeba")
    ds = data.load(str(root), seed=1, cache_dir=str(tmp_path / "cache"))
    assert ds.name == "celeba" and ds.weighting == "group-balanced" and ds.rho is None
    assert (ds.num_classes, ds.num_bias_classes) == (2, 2)
    assert ds.info["bias"] == "not Male" and ds.info["target"] == "Blond_Hair"
    assert ds.input_shape == (3, 64, 64)  # default size
    # val: per group 20% of the smallest training group (5) -> 1 each
    assert torch.equal(torch.bincount(2 * ds.val.y + ds.val.b, minlength=4), torch.ones(4, dtype=torch.long))
    assert len(ds.train) == 52 - 4
    # test: the official *valid* partition cut to equal groups (smallest: 2)
    assert torch.equal(torch.bincount(2 * ds.test.y + ds.test.b, minlength=4), torch.full((4,), 2))
    # aligned = blond-female or dark-male: the majority of train
    assert float(ds.train.aligned().float().mean()) == pytest.approx(1 - (5 + 15 - 2) / 48)
    # red channel encodes blond, green encodes male: labels travel with their images
    red = ds.train.x[:, 0].float().mean((1, 2)) > 100
    green = ds.train.x[:, 1].float().mean((1, 2)) > 100
    assert torch.equal(red.long(), ds.train.y) and torch.equal((~green).long(), ds.train.b)


def test_celeba_options_and_cache(tmp_path):
    root = _celeba(tmp_path / "celeba")
    spec = f"celeba:{root},target=Male,bias=Blond_Hair,size=8,n_train=20"
    ds = data.load(spec, cache_dir=str(tmp_path / "cache"))
    assert ds.input_shape == (3, 8, 8) and len(ds.train) == 20 and ds.info["target"] == "Male"
    again = data.load(spec, cache_dir=str(tmp_path / "cache"))
    assert again.info["cache_hit"] and torch.equal(again.test.x, ds.test.x)


@pytest.mark.parametrize("damage, error, message", [
    (lambda r: (r / "list_eval_partition.txt").unlink(), FileNotFoundError, "list_eval_partition.txt not found"),
    (lambda r: (r / "list_attr_celeba.txt").write_text(
        (r / "list_attr_celeba.txt").read_text().replace(" 1 ", " 0 ", 1)), ValueError, "line 3: value '0' is not 1 or -1"),
    (lambda r: (r / "list_eval_partition.txt").write_text("000001.jpg 0\n"), ValueError,
     "no partition for 000002.jpg"),
    (lambda r: (r / "img_align_celeba" / "000003.jpg").write_bytes(b"xx"), ValueError, "cannot read image"),
])
def test_malformed_celeba_fails_with_its_message(tmp_path, damage, error, message):
    root = _celeba(tmp_path / "celeba")
    damage(root)
    with pytest.raises(error) as e:
        data.load(f"celeba:{root}", cache_dir=str(tmp_path / "cache"))
    assert message in str(e.value)
    assert not list((tmp_path / "cache").glob("*"))


def test_celeba_unknown_attribute_lists_the_names(tmp_path):
    root = _celeba(tmp_path / "celeba")
    with pytest.raises(ValueError, match="target='Smiling' is not a CelebA attribute.*Blond_Hair"):
        data.load(f"celeba:{root},target=Smiling", cache_dir=str(tmp_path / "cache"))


# --- Waterbirds -----------------------------------------------------------------------------

def _waterbirds(root, rows=None):
    rows = rows or [(y, place, split) for split in (0, 1, 2) for y in (0, 1) for place in (0, 1)
                    for _ in range(2 if split == 0 else 1)]
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for i, (y, place, split) in enumerate(rows):
        name = f"{i % 3:03d}.Species/bird_{i}.jpg"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (6, 4), (y * 250, place * 250, 0)).save(root / name)
        lines.append(f"{i},{name},{y},{split},{place},/x/y.jpg")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_waterbirds_loads_official_splits(tmp_path):
    root = _waterbirds(tmp_path / "wb")
    ds = data.load(f"waterbirds:{root},size=4", cache_dir=str(tmp_path / "cache"))
    assert ds.name == "waterbirds" and ds.weighting == "group-balanced"
    assert ds.info["sizes"] == {"train": 8, "val": 4, "test": 4} and ds.input_shape == (3, 4, 4)
    red = ds.train.x[:, 0].float().mean((1, 2)) > 100
    green = ds.train.x[:, 1].float().mean((1, 2)) > 100
    assert torch.equal(red.long(), ds.train.y) and torch.equal(green.long(), ds.train.b)
    bare = data.load(str(root), cache_dir=str(tmp_path / "cache"))  # detected from the columns
    assert bare.name == "waterbirds" and bare.input_shape == (3, 64, 64)


@pytest.mark.parametrize("rows_edit, message", [
    (lambda t: t.replace(",place,", ",location,"), "missing column 'place'"),
    (lambda t: t.replace("\n0,000.Species/bird_0.jpg,0,", "\n0,000.Species/bird_0.jpg,2,"), "line 2: y=2 is not in 0..1"),
    (lambda t: t.replace(",2,0,/x", ",1,0,/x").replace(",2,1,/x", ",1,1,/x"), "the test split is empty"),
])
def test_malformed_waterbirds_fails_with_its_message(tmp_path, rows_edit, message):
    root = _waterbirds(tmp_path / "wb")
    (root / "metadata.csv").write_text(rows_edit((root / "metadata.csv").read_text()))
    with pytest.raises(ValueError) as e:
        data.load(f"waterbirds:{root}", cache_dir=str(tmp_path / "cache"))
    assert message in str(e.value)


def test_a_split_made_by_hand_must_hold_uint8_images():
    """Split.inputs() divides by 255: float images in [0, 1] given to Split by hand were silently
    divided again (inputs in [0, 1/255]) and trained on; a label count that differs from the images
    failed later in a batch."""
    y = torch.arange(4) % 2
    with pytest.raises(ValueError, match=r"Split.x must be a uint8 tensor \(N, C, H, W\) of 0..255 pixel values, "
                                         r"got torch.float32 \(4, 3, 2, 2\)"):
        data.Split(torch.rand(4, 3, 2, 2), y, y)
    with pytest.raises(ValueError, match=r"Split.x must be a uint8 tensor .* got torch.uint8 \(4, 2, 2\)"):
        data.Split(torch.zeros(4, 2, 2, dtype=torch.uint8), y, y)
    with pytest.raises(ValueError, match=r"Split.y has 3 rows, Split.x 4 images"):
        data.Split(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), y[:3], y)
    with pytest.raises(ValueError, match=r"Split.b has 5 rows, Split.x 4 images"):
        data.Split(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), y, torch.zeros(5, dtype=torch.long))
    # labels of another kind were taken: a float b truncated (0.5 -> 0), a negative y failed in bincount
    x = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    for y_, b_, match in ((y, y + 0.5, r"Split.b must be an integer tensor of shape \(N,\) or \(N, 2\), got "
                                       r"torch.float32 \(4,\)"),
                          (y[:, None], y, r"Split.y must be an integer tensor of shape \(N,\), got torch.int64 \(4, 1\)"),
                          (y - 1, y, r"Split.y holds a negative label \(-1\)"),
                          (y, y.bool(), "Split.b must be an integer tensor")):
        with pytest.raises(ValueError, match=match):
            data.Split(x, y_, b_)
    split = data.Split(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), y, None)  # no bias labels: label-free
    assert len(split.subset(slice(0, 2))) == 2 and "b=None" in repr(split)


def test_a_builtin_name_is_the_builtin_where_a_folder_of_that_name_exists(tmp_path, monkeypatch):
    """`bise run --data colored-digits --out colored-digits` made the folder, then read it as the data."""
    from bise.data.spec import parse

    monkeypatch.chdir(tmp_path)
    (tmp_path / "colored-digits").mkdir()
    assert parse("colored-digits")[:2] == ("builtin", "colored-digits")
    assert parse("colored-digits:rho=0.9")[0] == "builtin"
    assert parse("./colored-digits")[0] == "folder" and parse("folder:colored-digits")[0] == "folder"


# --- audit additions: option checks, second draws, CSV whitespace, cache staleness, layouts ------------------

def test_npz_rho_options_are_checked(tmp_path):
    """rho=0 (falsy) was dropped unchecked; rho= with rho_l= and rho_r= must be refused; rho=1 is no fraction."""
    np.savez(tmp_path / "one.npz", **_npz_arrays())
    for rho in ("0", "1.0"):
        with pytest.raises(ValueError, match=f"rho={float(rho)}: must lie strictly between 0 and 1"):
            data.load(f"npz:{tmp_path / 'one.npz'},rho={rho}")
    with pytest.raises(ValueError, match="not both"):
        data.load(f"npz:{tmp_path / 'one.npz'},rho=0.9,rho_l=0.9,rho_r=0.8")


def test_npz_second_draw_keys_are_read_and_must_come_together(tmp_path):
    import warnings
    arrays = _npz_arrays()
    arrays.update(mask_x=arrays["train_x"], mask_y=arrays["train_y"], mask_b=arrays["train_b"])
    np.savez(tmp_path / "m.npz", **arrays)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mask_ keys are read, not "keys ... are not read"
        ds = data.load(str(tmp_path / "m.npz"))
    assert ds.mask_train is not None and len(ds.mask_train) == 12
    arrays.pop("mask_b")
    np.savez(tmp_path / "half.npz", **arrays)
    with pytest.raises(ValueError, match=r"a second draw needs all of mask_x, mask_y, mask_b; found only "
                                         r"\['mask_x', 'mask_y'\]"):
        data.load(str(tmp_path / "half.npz"))


def test_metadata_with_spaces_around_names_and_values_loads(tmp_path):
    """A CSV written with ', ' between fields (header and cells) reads as the plain one."""
    root = _folder(tmp_path / "sp", ROWS)
    plain = data.load(f"folder:{root}", cache_dir=str(tmp_path / "c1"))
    lines = (root / "metadata.csv").read_text().splitlines()
    (root / "metadata.csv").write_text("\n".join(", ".join(line.split(",")) for line in lines) + "\n")
    spaced = data.load(f"folder:{root}", cache_dir=str(tmp_path / "c2"))
    assert torch.equal(spaced.train.x, plain.train.x) and torch.equal(spaced.test.b, plain.test.b)


def test_editing_metadata_invalidates_the_cache_even_at_the_same_size(tmp_path):
    import os
    root = _folder(tmp_path / "ed", ROWS)
    first = data.load(str(root), cache_dir=str(tmp_path / "c"))
    assert first.train.b.tolist() == [0, 1, 0]
    before = (root / "metadata.csv").stat()
    _break_csv(root, 2, "b", "1")  # relabel the first training image's bias: same file size
    os.utime(root / "metadata.csv", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert (root / "metadata.csv").stat().st_size == before.st_size
    again = data.load(str(root), cache_dir=str(tmp_path / "c"))
    assert not again.info["cache_hit"] and again.train.b.tolist() == [1, 1, 0]


def test_bad_spec_options_and_paths_are_named(tmp_path):
    root = _folder(tmp_path / "d", ROWS)
    with pytest.raises(ValueError, match="option '=5' is not of the form key=value"):
        data.load("colored-digits:=5", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="option size=0 must be >= 1"):
        data.load(f"folder:{root},size=0", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="option n_train=-1 must be >= 0"):
        data.load(f"waterbirds:{_waterbirds(tmp_path / 'wb')},n_train=-1", cache_dir=str(tmp_path / "c"))
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="expected an .npz file or a directory"):
        data.load(str(tmp_path / "table.csv"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(TypeError, match="cache_dir must be a path"):
        data.load("colored-digits", cache_dir=5)


def test_splits_must_agree_on_the_number_of_biases(tmp_path):
    arrays = _npz_arrays()
    arrays["test_b"] = np.stack([arrays["test_b"], arrays["test_y"]], axis=1)
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError, match="splits disagree on bias label shape"):
        data.load(str(tmp_path / "d.npz"))


def test_bias_classes_are_counted_over_every_split(tmp_path):
    arrays = _npz_arrays(k=3)
    arrays["test_b"][1] = 3  # a bias class no training sample has
    np.savez(tmp_path / "d.npz", **arrays)
    assert data.load(str(tmp_path / "d.npz")).num_bias_classes == 4
    with pytest.raises(ValueError, match=r"test_b\[1\] = 3: out of range for num_bias_classes=3"):
        data.load(f"npz:{tmp_path / 'd.npz'},num_bias_classes=3")


def test_a_split_made_by_hand_refuses_negative_bias_labels():
    y = torch.arange(4) % 2
    with pytest.raises(ValueError, match=r"Split.b holds a negative label \(-1\)"):
        data.Split(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), y, y - 1)


def test_mixed_grey_and_colour_images_read_as_colour(tmp_path):
    """A grey image first, colour ones after: the grey ones widen to three equal channels."""
    root = _folder(tmp_path / "mix", ROWS)
    Image.new("L", (4, 4), 77).save(root / "img" / "train_0.png")
    ds = data.load(str(root), cache_dir=str(tmp_path / "c"))
    assert ds.input_shape == (3, 4, 4)
    assert ds.train.x[0].unique().tolist() == [77]


def test_bilevel_images_read_as_grey(tmp_path):
    ds = data.load(str(_folder(tmp_path / "bw", ROWS, mode="1")), cache_dir=str(tmp_path / "c"))
    assert ds.input_shape == (1, 4, 4) and set(ds.train.x.unique().tolist()) <= {0, 255}


def test_size_resizes_bilinearly(tmp_path):
    root = _folder(tmp_path / "bl", ROWS)
    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    img.save(root / "img" / "train_0.png")
    ds = data.load(f"folder:{root},size=3", cache_dir=str(tmp_path / "c"))
    want = np.asarray(img.resize((3, 3), Image.BILINEAR))
    assert ds.train.x[0].permute(1, 2, 0).numpy().tolist() == want.tolist()


def test_a_folder_with_a_place_column_is_still_a_folder(tmp_path):
    """Extra columns are ignored: a 'place' column does not make a user folder Waterbirds."""
    root = _folder(tmp_path / "pl", ROWS)
    text = (root / "metadata.csv").read_text().replace(",note", ",place", 1)
    (root / "metadata.csv").write_text(text)
    assert data.load(str(root), cache_dir=str(tmp_path / "c")).name == "pl"


def test_celeba_malformed_lines_and_missing_groups_are_named(tmp_path):
    root = _celeba(tmp_path / "a")
    text = (root / "list_attr_celeba.txt").read_text().splitlines()
    text[2] = text[2].rsplit(" ", 1)[0]  # one value short
    (root / "list_attr_celeba.txt").write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match="line 3: 2 values for 3 attributes"):
        data.load(f"celeba:{root}", cache_dir=str(tmp_path / "c"))
    root = _celeba(tmp_path / "b")
    (root / "list_eval_partition.txt").write_text(
        (root / "list_eval_partition.txt").read_text().replace("000001.jpg 0", "000001.jpg 3"))
    with pytest.raises(ValueError, match=r"line 1: expected '<filename> <0\|1\|2>'"):
        data.load(f"celeba:{root}", cache_dir=str(tmp_path / "c"))
    groups = {0: CELEBA_GROUPS[0], 1: {**CELEBA_GROUPS[1], (1, 1): 0}, 2: CELEBA_GROUPS[2]}
    root = _celeba(tmp_path / "g", groups, lossless=True)
    with pytest.raises(ValueError, match="CelebA valid partition has no sample with y=1, b=0"):
        data.load(f"celeba:{root}", cache_dir=str(tmp_path / "c"))


def test_celeba_protocol_details(tmp_path):
    """val is 20% of the smallest train group per group; no image twice in a split; train shuffled;
    n_train stratified by group; a trailing blank line is fine; b is oriented on the *train* partition."""
    groups = {0: {(1, 0): 30, (1, 1): 10, (0, 0): 25, (0, 1): 40},
              1: {(1, 0): 3, (1, 1): 3, (0, 0): 3, (0, 1): 3}, 2: CELEBA_GROUPS[2]}
    root = _celeba(tmp_path / "c", groups, blank_line=True, lossless=True)
    ds = data.load(str(root), seed=2, cache_dir=str(tmp_path / "cache"))
    assert torch.bincount(2 * ds.val.y + ds.val.b, minlength=4).tolist() == [2, 2, 2, 2]  # int(0.2 * 10)
    for sp in (ds.train, ds.val, ds.test):
        assert len(torch.unique(sp.x[:, 2, 0, 0])) == len(sp)  # blue = image index: no duplicate
    assert (np.diff(ds.train.y.numpy()) != 0).sum() > 4  # not in file (group) order
    from bise.data.assign import allocate
    small = data.load(f"celeba:{root},n_train=40", seed=2, cache_dir=str(tmp_path / "cache"))
    full = torch.bincount(2 * ds.train.y + ds.train.b, minlength=4).numpy()
    assert torch.bincount(2 * small.train.y + small.train.b, minlength=4).tolist() == allocate(40, full).tolist()
    # train: blond-male + dark-female = 35 of 105 -> b = not Male; over all partitions it would not be
    flip = {0: groups[0], 1: {(1, 0): 1, (1, 1): 60, (0, 0): 60, (0, 1): 1}, 2: CELEBA_GROUPS[2]}
    ds = data.load(str(_celeba(tmp_path / "f", flip, lossless=True)), cache_dir=str(tmp_path / "cache"))
    assert ds.info["bias"] == "not Male"


def test_waterbirds_n_train_is_stratified_by_group_and_splits_are_shuffled(tmp_path):
    from bise.data.assign import allocate
    rows = [(y, p, 0) for y, p, n in ((0, 0, 30), (0, 1, 4), (1, 0, 4), (1, 1, 30)) for _ in range(n)]
    rows += [(y, p, s) for s in (1, 2) for y in (0, 1) for p in (0, 1)]
    root = _waterbirds(tmp_path / "wb", rows)
    full = data.load(f"waterbirds:{root},size=4", cache_dir=str(tmp_path / "c"))
    assert (np.diff((2 * full.train.y + full.train.b).numpy()) != 0).sum() > 4  # not in file order
    ds = data.load(f"waterbirds:{root},size=4,n_train=17", cache_dir=str(tmp_path / "c"))
    groups = torch.bincount(2 * ds.train.y + ds.train.b, minlength=4)
    assert groups.tolist() == allocate(17, np.array([30, 4, 4, 30])).tolist()


def test_celeba_and_waterbirds_without_enough_training_samples_are_named(tmp_path):
    groups = {0: {**CELEBA_GROUPS[0], (1, 1): 4}, 1: CELEBA_GROUPS[1], 2: CELEBA_GROUPS[2]}
    root = _celeba(tmp_path / "c", groups, lossless=True)
    with pytest.raises(ValueError, match="the smallest training group has fewer than 5 samples"):
        data.load(str(root), cache_dir=str(tmp_path / "cache"))
    root = _waterbirds(tmp_path / "wb", [(y, p, s) for s in (1, 2) for y in (0, 1) for p in (0, 1)])
    with pytest.raises(ValueError, match=r"no rows with split=0 \(the train split is empty\)"):
        data.load(str(root), cache_dir=str(tmp_path / "cache"))
