"""On-disk cache of generated splits: one .npz per (canonical spec, seed, code version); writing
one removes the files of the same spec and seed left by older code versions.

The file holds the arrays, a JSON metadata string and a sha256 over the arrays' bytes, dtypes
and shapes plus the spec and seed. It is written to a temporary file in the same
folder and renamed into place, so a crash never leaves a partial cache file; a file whose
checksum does not match (or that does not open) is reported, removed and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..checkpoint import replace_atomic

_META, _SUM = "__meta__", "__checksum__"


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 of this package's sources: any change to the generators invalidates old caches."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def default_dir() -> Path:
    """$BISE_CACHE_DIR, else ~/.cache/bise."""
    env = os.environ.get("BISE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "bise"


def path_for(cache_dir: Path, name: str, key: str, seed: int) -> Path:
    """Cache file for a canonical spec string and seed: NAME-<spec+seed hash>-<code version>.npz."""
    digest = hashlib.sha256(f"{key}|seed={seed}".encode()).hexdigest()
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:40]
    return Path(cache_dir) / f"{slug}-{digest[:16]}-{code_version()[:8]}.npz"


def _remove_stale(path: Path) -> None:
    """Delete files of the same spec and seed written by other code versions."""
    prefix = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{prefix}-*.npz"):
        if old != path:
            old.unlink(missing_ok=True)


def checksum(arrays: dict, key: str, seed: int) -> str:
    """sha256 over every array (name, dtype, shape, bytes) plus spec and seed: what the data are, which a run's
    run.json records. Not the code version (the file's name has it): an edit to bise/data that leaves the arrays
    as they were made every earlier run refuse its data as "other contents"."""
    h = hashlib.sha256(f"{key}|seed={seed}".encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def read(path: Path, key: str, seed: int):
    """(arrays, meta, checksum) from a valid cache file, or None if absent or corrupt (removed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k not in (_META, _SUM)}
            meta, stored = json.loads(str(z[_META])), str(z[_SUM])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return _discard(path, f"unreadable ({type(e).__name__}: {e})")
    actual = checksum(arrays, key, seed)
    if actual != stored:
        return _discard(path, "checksum mismatch")
    return arrays, meta, actual


def _discard(path: Path, why: str):
    warnings.warn(f"bise.data: cache file {path} is corrupt ({why}); rebuilding it", stacklevel=3)
    path.unlink(missing_ok=True)
    return None


def write(path: Path, arrays: dict, meta: dict, key: str, seed: int) -> str:
    """Atomically write arrays + meta; returns the checksum."""
    digest = checksum(arrays, key, seed)

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: given a path, np.savez appends .npz to it
            np.savez(f, **arrays, **{_META: np.array(json.dumps(meta)), _SUM: np.array(digest)})

    replace_atomic(path, save)  # with the umask's permissions: mkstemp's 0600 would hide a shared cache
    _remove_stale(path)
    return digest
