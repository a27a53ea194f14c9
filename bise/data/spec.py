"""One entry point, load(spec): parse the spec string, build or read the cached splits.

Spec syntax (docs/data.md):
  NAME[:key=value,...]                   a built-in benchmark, e.g. "biased-mnist:rho=0.997"
  PATH.npz | DIR                         the user's data; DIR is detected as CelebA
                                         (list_attr_celeba.txt), Waterbirds (metadata.csv with
                                         img_filename, place) or an image folder (metadata.csv)
  npz:PATH[,key=value,...]               the same with options; likewise folder:DIR[,...],
  celeba:ROOT[,...]  waterbirds:ROOT[,...]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from . import builtin, cache, celeba, user, waterbirds
from .sources import default_data_dir
from .types import BiasedDataset, Split

_SIZE = {"size": (int, 64), "n_train": (int, 0)}
KIND_OPTIONS = {
    "npz": {k: (t, None) for k, t in user.USER_OPTIONS.items()},
    "folder": {**{k: (t, None) for k, t in user.USER_OPTIONS.items()}, "size": (int, None)},
    "celeba": {"target": (str, "Blond_Hair"), "bias": (str, "Male"), **_SIZE},
    "waterbirds": dict(_SIZE),
}
_LOADERS = {"folder": lambda root, spec, opts, seed: user.load_folder(root, spec, opts),
            "celeba": celeba.load_celeba, "waterbirds": waterbirds.load_waterbirds}


def available() -> dict:
    """Built-in benchmark name -> one-line description."""
    return builtin.available()


def _options(spec: str, text: str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"spec {spec!r}: option {item!r} is not of the form key=value")
        if key.strip() in out:
            raise ValueError(f"spec {spec!r}: option {key.strip()!r} given twice")
        out[key.strip()] = value.strip()
    return out


def _detect(path: Path) -> str:
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"{path}: expected an .npz file or a directory")
        return "npz"
    if (path / celeba.ATTR).is_file():
        return "celeba"
    return "waterbirds" if waterbirds.is_waterbirds(path) else "folder"


def parse(spec: str) -> tuple:
    """(kind, name-or-path, raw options); kind is 'builtin', 'npz', 'folder', 'celeba' or 'waterbirds'."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"spec={spec!r}: expected a built-in name, a path, or KIND:PATH")
    text = spec.strip()
    head, _, rest = text.partition(":")
    if head in builtin.BUILTINS:  # before paths: a folder named colored-digits (an --out) is ./colored-digits
        return "builtin", head, _options(spec, rest)
    path = Path(text).expanduser()
    if path.exists():
        return _detect(path), path, {}
    if head in KIND_OPTIONS:
        where, _, opts = rest.partition(",")
        if not where.strip():
            raise ValueError(f"spec {spec!r}: {head} needs a path: {head}:PATH[,key=value,...]")
        where = Path(where.strip()).expanduser()
        if not where.exists():
            raise FileNotFoundError(f"spec {spec!r}: no such file or directory: {where}")
        return head, where, _options(spec, opts)
    if "/" in text or text.endswith(".npz") or text.startswith("."):
        raise FileNotFoundError(f"spec {spec!r}: no such file or directory: {path}")
    raise ValueError(f"unknown dataset {spec!r}; built-ins: {', '.join(builtin.BUILTINS)}; or "
                     f"a path to an .npz / a directory, or npz:, folder:, celeba:, waterbirds: PATH")


def _typed(kind: str, raw: dict) -> dict:
    allowed = KIND_OPTIONS[kind]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ValueError(f"{kind}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    opts = {k: default for k, (_, default) in allowed.items()}
    for k, text in raw.items():
        try:
            opts[k] = allowed[k][0](text)
        except ValueError:
            raise ValueError(f"{kind}: option {k}={text!r} is not a valid "
                             f"{allowed[k][0].__name__}") from None
    for k in ("size", "n_train"):
        if opts.get(k) is not None and opts[k] < (1 if k == "size" else 0):
            raise ValueError(f"{kind}: option {k}={opts[k]} must be {'>= 1' if k == 'size' else '>= 0'}")
    return opts


def _stamp(kind: str, root: Path) -> str:
    """Size and mtime of the metadata files, so editing them invalidates the cache."""
    names = {"celeba": (celeba.ATTR, celeba.PARTITION)}.get(kind, ("metadata.csv",))
    stats = [(root / n).stat() for n in names if (root / n).exists()]
    return ";".join(f"{s.st_size}@{s.st_mtime_ns}" for s in stats)


def _to_arrays(ds: BiasedDataset) -> tuple:
    arrays = {}
    for s in ("train", "val", "test"):
        sp = getattr(ds, s)
        if sp is not None:
            arrays.update({f"{s}_x": sp.x.numpy(), f"{s}_y": sp.y.numpy(), f"{s}_b": sp.b.numpy()})
    meta = {"name": ds.name, "num_classes": ds.num_classes, "num_bias_classes": ds.num_bias_classes,
            "num_biases": ds.num_biases, "rho": ds.rho, "weighting": ds.weighting, "info": ds.info}
    return arrays, meta


def _from_arrays(name: str, spec: str, arrays: dict, meta: dict) -> BiasedDataset:
    def split(s):
        if f"{s}_x" not in arrays:
            return None
        src = arrays.get(f"{s}_src")
        return Split(*(torch.from_numpy(arrays[f"{s}_{a}"]) for a in "xyb"),
                     None if src is None else torch.from_numpy(src))
    rho = tuple(meta["rho"]) if isinstance(meta["rho"], list) else meta["rho"]
    return BiasedDataset(name, split("train"), split("val"), split("test"), meta["num_classes"],
                         meta["num_bias_classes"], meta["num_biases"], rho, meta["weighting"],
                         spec, dict(meta["info"]))


def _key(kind: str, target, opts: dict) -> str:
    """The cache key of a built-in or a folder-like dataset: what identifies its data (canonical_spec)."""
    options = ",".join(f"{k}={opts[k]}" for k in sorted(opts))
    if kind == "builtin":
        return f"{target}:{options}"
    return f"{kind}:{target},{options}|{_stamp(kind, target)}"


def canonical(spec: str, data_dir: Optional[str] = None) -> Optional[str]:
    """load(spec)'s ``canonical_spec`` without loading: two spellings of one dataset
    (``colored-digits`` and ``colored-digits:rho=0.99``) give one key. None for an .npz (read
    directly: its spec is its identity)."""
    kind, target, raw = parse(os.fspath(spec) if isinstance(spec, os.PathLike) else spec)
    if kind == "npz":
        return None
    if kind == "builtin":
        data_dir = Path(data_dir) if data_dir else default_data_dir()
        return _key(kind, target, builtin.resolve_options(target, raw, data_dir))
    return _key(kind, target.resolve(), _typed(kind, raw))


def load(spec: str, *, seed: int = 0, data_dir: Optional[str] = None,
         cache_dir: Optional[str] = None) -> BiasedDataset:
    """Load a dataset by spec (module docstring): built-ins are generated from the seed and cached
    in cache_dir (default $BISE_CACHE_DIR or ~/.cache/bise), as are image folders, CelebA and
    Waterbirds (decoded and resized once); an .npz is read directly."""
    from ..validate import seed as check_seed

    seed = check_seed(seed)
    for name, value in (("data_dir", data_dir), ("cache_dir", cache_dir)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TypeError(f"{name} must be a path (str or os.PathLike) or None, got {value!r}")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    kind, target, raw = parse(os.fspath(spec) if isinstance(spec, os.PathLike) else spec)
    if kind == "npz":
        return user.load_npz(target, spec, _typed(kind, raw))
    if kind == "builtin":
        name = target
        opts = builtin.resolve_options(name, raw, data_dir)
        key = _key(kind, name, opts)
        cache_key = _source_key(key, name, opts, data_dir)

        def build():
            arrays, meta = builtin.build(name, opts, seed, data_dir)
            meta["info"]["options"] = opts
            return arrays, {**meta, "name": name}
    else:
        opts = _typed(kind, raw)
        root = target.resolve()
        key = cache_key = _key(kind, root, opts)
        name = kind if kind != "folder" else root.name

        def build():
            return _to_arrays(_LOADERS[kind](root, spec, opts, seed))
    cache_dir = Path(cache_dir) if cache_dir else cache.default_dir()
    arrays, meta, path, hit, digest = _cached(cache_dir, name, cache_key, key, seed, build)
    ds = _from_arrays(meta["name"], spec, arrays, meta)
    ds.info.update({"cache_path": str(path), "cache_hit": hit, "checksum": digest,
                    "canonical_spec": key})
    if kind == "builtin":
        ds.info["generator"] = {"name": name, "options": opts, "seed": seed, "data_dir": str(data_dir),
                                "cache_dir": str(cache_dir), "key": key}
    return ds


def _source_key(key: str, name: str, opts: dict, data_dir: Path) -> str:
    """The cache key of a built-in: its canonical spec plus which source files it is generated from
    (:func:`builtin.source_stamp`); the canonical spec alone, which names the dataset in a run's
    record, would answer ``data_dir=B`` with the data cached from folder A."""
    stamp = builtin.source_stamp(name, opts, data_dir)
    return f"{key}|sources={stamp}" if stamp else key


def _cached(cache_dir: Path, name: str, key: str, canonical: str, seed: int, build) -> tuple:
    """(arrays, meta, path, hit, checksum): the cache file for (``key``, seed), built and written on a miss;
    the checksum (which a run records) is salted with the ``canonical`` spec, not with ``key``'s source
    stamps: a copied or touched data folder (new mtimes, same bytes) is the same data."""
    path = cache.path_for(cache_dir, name, key, seed)
    hit = cache.read(path, canonical, seed)
    if hit is None:
        arrays, meta = build()
        return arrays, meta, path, False, cache.write(path, arrays, meta, canonical, seed)
    return (*hit[:2], path, True, hit[2])


def redraw(ds: BiasedDataset, draw: int = 1) -> Split:
    """A second draw of a built-in benchmark's training split (cached like the benchmark itself):
    the same source images in the same order, bias labels and rendering drawn afresh from
    (seed, draw). Raises ValueError for data without a generator (user files)."""
    gen = ds.info.get("generator")
    if gen is None:
        raise ValueError(f"{ds.name}: fixed data has no generator, so it has no second draw of its training "
                         "set (an .npz may supply one as mask_x / mask_y / mask_b)")
    key = f"{_source_key(gen['key'], gen['name'], gen['options'], Path(gen['data_dir']))}|draw={draw}"
    arrays, _, _, _, _ = _cached(Path(gen["cache_dir"]), gen["name"], key, f"{gen['key']}|draw={draw}", gen["seed"],
                                 lambda: builtin.build(gen["name"], gen["options"], gen["seed"],
                                                       Path(gen["data_dir"]), draw=draw))
    return Split(*(torch.from_numpy(arrays[f"train_{a}"]) for a in ("x", "y", "b", "src")))
