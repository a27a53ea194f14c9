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

from . import benchmarks, cache, celeba, user, waterbirds
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
    return benchmarks.available()


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
    path = Path(text).expanduser()
    if path.exists():
        return _detect(path), path, {}
    head, _, rest = text.partition(":")
    if head in benchmarks.BUILTINS:
        return "builtin", head, _options(spec, rest)
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
    raise ValueError(f"unknown dataset {spec!r}; built-ins: {', '.join(benchmarks.BUILTINS)}; or "
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


def load(spec: str, *, seed: int = 0, data_dir: Optional[str] = None,
         cache_dir: Optional[str] = None) -> BiasedDataset:
    """Load a dataset by spec (module docstring): built-ins are generated from the seed and cached
    in cache_dir (default $BISE_CACHE_DIR or ~/.cache/bise), as are image folders, CelebA and
    Waterbirds (decoded and resized once); an .npz is read directly."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected a non-negative integer")
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    kind, target, raw = parse(os.fspath(spec) if isinstance(spec, os.PathLike) else spec)
    if kind == "npz":
        return user.load_npz(target, spec, _typed(kind, raw))
    if kind == "builtin":
        name = target
        opts = benchmarks.resolve_options(name, raw, data_dir)
        key = name + ":" + ",".join(f"{k}={opts[k]}" for k in sorted(opts))

        def build():
            arrays, meta = benchmarks.build(name, opts, seed, data_dir)
            meta["info"]["options"] = opts
            return arrays, {**meta, "name": name}
    else:
        opts = _typed(kind, raw)
        root = target.resolve()
        key = (f"{kind}:{root}," + ",".join(f"{k}={opts[k]}" for k in sorted(opts))
               + f"|{_stamp(kind, root)}")
        name = kind if kind != "folder" else root.name

        def build():
            return _to_arrays(_LOADERS[kind](root, spec, opts, seed))
    path = cache.path_for(Path(cache_dir) if cache_dir else cache.default_dir(), name, key, seed)
    hit = cache.read(path, key, seed)
    if hit is None:
        arrays, meta = build()
        digest = cache.write(path, arrays, meta, key, seed)
    else:
        arrays, meta, digest = hit
    ds = _from_arrays(meta["name"], spec, arrays, meta)
    ds.info.update({"cache_path": str(path), "cache_hit": hit is not None, "checksum": digest,
                    "canonical_spec": key})
    return ds
