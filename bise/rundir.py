"""The run directory (``--out``) of the bise CLI: lock, manifest, staged writes and provenance.

``run.json`` is the manifest: ``{"format": "bise-run-v2", "data": DATA, "artefacts": {file: ENTRY}}``
with DATA = {"spec" (resolved), "seed", "canonical_spec", "sha256" (of the data's contents)} and
ENTRY = {"sha256" (of the file; null for checkpoint.pt, rewritten every epoch), "step", "data": DATA,
"inputs": {file in --out or absolute path: sha256}, "settings": {...}, "seconds"}.

* A command holds an exclusive ``flock`` on ``--out/.bise.lock`` for its whole life; a second one
  is refused with the holder's pid.
* A step writes its outputs into ``--out/.bise-new/`` and :meth:`RunDir.commit` moves them into
  place only when the step succeeded; artefacts made from a replaced file (recursively) are then
  removed. The manifest is saved without the replaced entries first and with the new ones last, so
  a kill at any point leaves either a consistent chain or files that :meth:`RunDir.require` refuses.
* :meth:`RunDir.require` checks, before a step reads a file, that its content hash, data and inputs
  match the manifest.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from . import distributed
from .checkpoint import replace_atomic, umask_mode

FORMAT = "bise-run-v2"
MANIFEST = "run.json"
LOCK = ".bise.lock"
STAGING = ".bise-new"


class UsageError(Exception):
    """Bad input from the command line: reported on stderr with exit status 2."""


def sha256(path) -> str:
    """Content hash of a file (1 MiB reads)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _describe_data(rec: Optional[dict]) -> str:
    return "none" if rec is None else f"--data {rec.get('spec')!r} --seed {rec.get('seed')}"


def _same_making(old: Optional[dict], new: dict) -> bool:
    """Whether a file written again leaves what was made from it current: the same bytes made by the same
    step from the same data and inputs with the same settings (only its seconds differ). Bytes alone do
    not tell: `bise export --overwrite --round-to 1` writes the file of no rounding, and a report that
    records the export's settings would then disagree with run.json."""
    def plain(entry: dict) -> str:
        return json.dumps({k: entry.get(k) for k in ("sha256", "step", "data", "inputs", "settings")}, sort_keys=True,
                          default=str)

    return old is not None and plain(old) == plain(new)


_ENTRY_KEYS = {"sha256": (str, type(None)), "step": str, "data": (dict, type(None)), "inputs": dict, "settings": dict}


def _well_formed(manifest: object) -> bool:
    """Whether a parsed run.json has the shape of the module docstring (a hand-edited one may not:
    a missing key was a KeyError deep in a command)."""
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT):
        return False
    data, artefacts = manifest.get("data"), manifest.get("artefacts")
    if not (data is None or (isinstance(data, dict) and {"spec", "seed"} <= data.keys())):
        return False
    return isinstance(artefacts, dict) and all(
        isinstance(e, dict) and all(isinstance(e.get(k, ...), t) for k, t in _ENTRY_KEYS.items())
        for e in artefacts.values())


class RunDir:
    """One command's view of ``--out``; ``makers`` maps each file to the command that writes it."""

    def __init__(self, out, makers: dict):
        if not str(out).strip():  # Path("") is the current folder
            raise UsageError(f"--out must name a directory, got {str(out)!r}")
        self.out, self.makers = Path(out), makers
        self.staging = self.out / STAGING
        self.created = False
        self.manifest: dict = {"format": FORMAT, "data": None, "artefacts": {}}
        self._lock_fd: Optional[int] = None
        self._hashes: dict = {}
        self._ahead: list = []  # recorded by record_now, not yet written
        self.main = distributed.current().is_main

    # ------------------------------------------------------------------ lifetime

    def open(self, fresh: bool = False) -> None:
        """Create ``--out`` if missing, take the lock (rank 0), check writability, read run.json
        (``fresh``: ignore a run.json that this version cannot read; ``bise run --overwrite``)."""
        out = self.out
        error = None
        if self.main:  # rank 0 alone looks at --out before it exists: NFS clients cache a failed lookup, and a
            # rank on another machine that had looked could then miss the lock below
            try:
                self._create_and_lock()
            except (UsageError, OSError) as exc:
                error = exc
        distributed.raise_any(error)  # also the barrier: the others look at --out once it exists
        holder = (out / LOCK).read_text().strip() if (out / LOCK).is_file() else ""
        distributed.check_same(f"locked by pid {holder}" if holder else "not locked", f"--out {str(out)!r}",
                               "every process must see the same --out: put it on a filesystem that all machines share")
        if (out / MANIFEST).is_file():
            try:
                manifest = json.loads((out / MANIFEST).read_text())
                problem = None if _well_formed(manifest) else "is not a run file of this version of bise"
            except ValueError as exc:  # bise writes it atomically: damaged or edited by hand
                manifest, problem = None, f"is corrupt (not JSON: {exc})"
            except OSError as exc:
                manifest, problem = None, f"cannot be read ({exc.strerror})"
            if problem is not None and not fresh:
                raise UsageError(f"{out / MANIFEST} {problem}; choose another --out or pass --overwrite (bise run)")
            self.manifest = manifest if problem is None else self.manifest
        distributed.barrier()

    def _create_and_lock(self) -> None:
        """Rank 0's part of :meth:`open`: create --out if missing and take its lock (UsageError if not)."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {str(out)!r} exists and is not a directory")
        if not out.exists():
            try:
                out.mkdir(parents=True)
            except OSError as exc:
                raise UsageError(f"--out {str(out)!r} cannot be created: {exc.strerror}") from None
            self.created = True
        self._lock()
        shutil.rmtree(self.staging, ignore_errors=True)  # left by a killed command, as are the temporary
        for name in (*self.makers, MANIFEST):  # files of its atomic writes (checkpoint.replace_atomic)
            for tmp in out.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)

    def _lock(self) -> None:
        path = self.out / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, umask_mode())
            probe = self.out / f".bise-write-test.{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"--out {str(self.out)!r} is not writable ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UsageError(f"--out {str(self.out)!r} is in use by another bise command (pid {holder}); wait for "
                             "it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)  # on NFS, the other ranks read it (open) to check that they see this --out
        self._lock_fd = fd

    def close(self, failed: bool) -> None:
        """Remove the staging folder (and, after a failure, an ``--out`` this command created and left
        without artefacts), then release the lock. Nothing when this command did not take the lock: the
        staging folder is then another command's, in progress."""
        if not self.main or (self._lock_fd is None and not self.created):
            return
        shutil.rmtree(self.staging, ignore_errors=True)
        unwritten = self.unwritten()
        if failed and unwritten:  # recorded ahead by a command that failed before writing it (a checkpoint)
            for name in unwritten:
                del self.artefacts[name]
            self._save()
        if failed and self.created and not self.manifest["artefacts"]:
            (self.out / MANIFEST).unlink(missing_ok=True)
            (self.out / LOCK).unlink(missing_ok=True)
            try:
                self.out.rmdir()
            except OSError:
                pass
        if self._lock_fd is not None:
            os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ manifest

    @property
    def artefacts(self) -> dict:
        return self.manifest["artefacts"]

    def path(self, name: str) -> Path:
        return self.out / name

    def has(self, name: str) -> bool:
        return self.path(name).is_file()

    def staged(self, name: str) -> Path:
        """Where a step writes ``name`` (moved into ``--out`` by :meth:`commit`)."""
        return self.staging / name

    def _save(self) -> None:
        """Write run.json (rank 0 alone: the caller synchronises the ranks)."""
        text = json.dumps(self.manifest, indent=1, default=str)

        replace_atomic(self.path(MANIFEST), lambda tmp: Path(tmp).write_text(text))

    def _synced(self) -> None:
        """After rank 0 changed --out: every rank waits, then the others re-read run.json."""
        distributed.barrier()
        if not self.main:
            self.manifest = json.loads(self.path(MANIFEST).read_text())

    def hash(self, path) -> str:
        """:func:`sha256` of ``path``, computed once per (path, size, mtime) in this command."""
        path = Path(path)
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = sha256(path)
        return self._hashes[key]

    def entry(self, *, step: str, data: dict, inputs: dict, settings: dict, seconds: Optional[float] = None) -> dict:
        """A manifest entry (module docstring); :meth:`commit` fills in the file's sha256."""
        return {"sha256": None, "step": step, "data": data, "inputs": inputs, "settings": settings,
                "seconds": seconds}

    def unwritten(self) -> list:
        """The files this command recorded ahead (:meth:`record_now`) and has not written yet."""
        return [n for n in self._ahead if n in self.artefacts and not self.has(n)]

    def record_now(self, name: str, entry: dict) -> None:
        """Record a file written in place (the extraction checkpoint) before it exists; a command that
        fails before writing it leaves no record of it (:meth:`close`)."""
        if self.main:
            self._ahead.append(name)
            self.artefacts[name] = entry
            self.manifest["data"] = entry["data"]
            self._save()
        self._synced()

    # ------------------------------------------------------------------ reading

    def require(self, name: str, data: dict, hashed: bool = True) -> Path:
        """The path of ``name`` after checking it against the manifest: present, recorded, unchanged
        (content hash), made from ``data`` and from the current version of each of its inputs."""
        path, entry, maker = self.path(name), self.artefacts.get(name), self.makers.get(name, "run")
        if not path.is_file():
            started = [n for n, m in self.makers.items() if m == maker and n != name and n in self.artefacts
                       and self.has(n)]  # the extraction's checkpoint: that step started and was cut short
            if started and entry is None:
                raise UsageError(f"{path} is missing: the `bise {maker}` that {started[0]} holds did not finish; "
                                 f"continue it with `bise {maker} --out {self.out} --resume` and the options it "
                                 "was started with")
            raise UsageError(f"{path} is missing; run `bise {maker} --out {self.out}` first")
        if entry is None:
            raise UsageError(f"{path} is not recorded in {MANIFEST} (written by another program or an older "
                             f"bise); make it again with `bise {maker} --out {self.out} --overwrite`")
        if hashed and entry["sha256"] is not None and self.hash(path) != entry["sha256"]:
            raise UsageError(f"{path} changed after `bise {entry['step']}` wrote it (its content hash differs from "
                             f"{MANIFEST}); make it again with `bise {maker} --out {self.out} --overwrite`")
        made = entry["data"]
        if made != data and made is not None and data is not None and \
                (made.get("spec"), made.get("seed")) == (data.get("spec"), data.get("seed")):
            raise UsageError(f"{path} was made from other contents of --data {data.get('spec')!r} (their hash or "
                             f"options differ from {MANIFEST}): restore those data, or start the run again with "
                             "`bise run --overwrite`")
        if made != data:
            raise UsageError(f"{path} was made from {_describe_data(made)}, this command uses "
                             f"{_describe_data(data)}; pass the run's --data/--seed or make it again with "
                             f"`bise {maker} --overwrite`")
        for source, digest in entry["inputs"].items():
            current = self.artefacts.get(source, {}).get("sha256") if "/" not in source else digest
            if current != digest:
                raise UsageError(f"{path} was made from another {source} than the one in --out; make it again with "
                                 f"`bise {maker} --out {self.out} --overwrite`")
        return path

    def external(self, path: str, digest: str, used_by: str) -> Path:
        """An input outside ``--out`` (a ``--model`` file), checked against its recorded hash."""
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{used_by} was made from --model {path}, which no longer exists")
        if self.hash(p) != digest:
            raise UsageError(f"{used_by} was made from --model {path}, which has changed since (content hash "
                             "differs); extract again with --overwrite")
        return p

    # ------------------------------------------------------------------ writing

    def commit(self, outputs: dict, replaces: tuple = ()) -> None:
        """Move the staged ``outputs`` ({file: entry}) into ``--out``; files of ``replaces`` that the step
        did not write this time go too, as does every artefact made from a replaced version."""
        if self.main:
            new = dict(outputs)
            for name, entry in new.items():
                if entry["sha256"] is None and name != "checkpoint.pt":
                    entry["sha256"] = self.hash(self.staged(name))
            changed = {n for n in new if n == "checkpoint.pt" or not _same_making(self.artefacts.get(n), new[n])}
            changed |= {n for n in replaces if n not in new and (n in self.artefacts or self.has(n))}
            stale = self._made_from(changed, new)
            kept = {n: e for n, e in self.artefacts.items() if n not in changed and n not in stale}
            self.manifest["artefacts"] = kept
            self._save()  # from here on, readers refuse the files being replaced
            for name in new:
                if self.staged(name).is_file():
                    os.replace(self.staged(name), self.path(name))
            for name in (changed | stale) - set(new):
                self.path(name).unlink(missing_ok=True)
            self.manifest["artefacts"] = {**kept, **new}
            self.manifest["data"] = next(iter(new.values()))["data"] if new else self.manifest["data"]
            self._save()
        self._synced()

    def _made_from(self, changed: set, new: dict) -> set:
        """Recorded artefacts (other than ``new``) whose inputs include a changed file, recursively."""
        stale: set = set()
        while True:
            more = {n for n, e in self.artefacts.items()
                    if n not in new and n not in stale and n not in changed
                    and any(src in changed or src in stale for src in e["inputs"])}
            if not more:
                return stale
            stale |= more


__all__ = ["FORMAT", "LOCK", "MANIFEST", "RunDir", "STAGING", "UsageError", "sha256"]
