"""The cross-run stage cache: a stage's saved output, reused by any later run whose pipeline
matches up to and including that stage.

The key of a stage is its resume fingerprint (runner.Runner.fingerprints): a digest chained
from the seed, the model and data sections and the library versions (compresspipe, torch,
timm, torchao) and the world size, through every stage before it (name, type, full config with
defaults) to the stage itself. Equal keys mean the same input artifact, the same configuration
and the same code, so the same output up to run-to-run noise; anything else gives another key.

Layout of the cache directory (``cache.dir``; default ``.compresspipe-cache`` beside the
output directory, e.g. ``runs/.compresspipe-cache`` for ``runs/quickstart``)::

    objects/, refs/          the tensor store (core/store.py), shared with the run directories
    entries/<key>/           a stage output: artifact.json, tensors.json, metrics.json, the
                             deployable files, and entry.json (summary record, origin run)

Entries are evicted least recently used first when the directory outgrows ``cache.max_gb``;
tensors a run directory still names are kept (deleting the run directory frees them at the next
``compresspipe cache prune``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ..core.artifact import TENSORS_FILE, write_json
from ..core.store import TensorStore, manifest_objects
from .cache_config import DEFAULT_CACHE_NAME, ENV_CACHE_DIR, ENV_NO_CACHE, CacheConfig

ENTRIES = "entries"
ENTRY_FILE = "entry.json"
VERSIONED = ("compresspipe", "torch", "timm", "torchao")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a stage's output depends on (from package metadata,
    without importing them)."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def cache_dir(cfg: CacheConfig, output_dir: Path) -> Path:
    """Environment beats the file, which beats the default beside the output directory."""
    chosen = os.environ.get(ENV_CACHE_DIR) or cfg.dir
    return Path(chosen).resolve() if chosen else output_dir.resolve().parent / DEFAULT_CACHE_NAME


def cache_enabled(cfg: CacheConfig) -> bool:
    return cfg.enabled and os.environ.get(ENV_NO_CACHE, "") not in ("1", "true", "yes")


@dataclass
class Entry:
    key: str
    path: Path
    record: dict[str, Any]
    info: dict[str, Any]

    @property
    def origin_run(self) -> str | None:
        return self.info.get("run_id")


class StageCache:
    """Stage outputs by key, plus the tensor store they and the run directories share."""

    def __init__(self, root: Path, max_gb: float = 20.0):
        self.root = root
        self.store = TensorStore(root)
        self.max_bytes = int(max_gb * 1e9)

    def entry_path(self, key: str) -> Path:
        if not key.isalnum():
            raise ValueError(f"{key!r}: not a cache key")
        return self.root / ENTRIES / key

    def lookup(self, key: str) -> Entry | None:
        """The entry of ``key`` if it is complete and its tensors are all present."""
        path = self.entry_path(key)
        try:
            info = json.loads((path / ENTRY_FILE).read_text())
        except (OSError, ValueError):
            return None
        needed = manifest_objects(path / TENSORS_FILE)
        if not isinstance(info, dict) or any(not self.store.object_path(d).is_file()
                                             for d in needed):
            return None
        os.utime(path / ENTRY_FILE)  # least recently *used* goes first
        return Entry(key, path, info.get("record", {}), info)

    def restore(self, entry: Entry, directory: Path) -> None:
        """Put the entry's files in ``directory`` (replacing it); hard links where possible."""
        _copy_tree(entry.path, directory, skip={ENTRY_FILE})
        self.store.add_ref(directory / TENSORS_FILE)

    def record(self, key: str, directory: Path, record: dict[str, Any], run_id: str | None,
               pipeline: str, tracking_uri: str | None = None) -> None:
        """Keep ``directory`` (a just-saved stage output) under ``key``, then enforce the limit.
        ``run_id``: its MLflow run in the store at ``tracking_uri`` (a run that reuses the entry
        in the same store need not log its deployable again)."""
        path = self.entry_path(key)
        _copy_tree(directory, path)
        write_json(path / ENTRY_FILE, {"key": key, "record": record, "run_id": run_id,
                                       "tracking_uri": tracking_uri,
                                       "pipeline": pipeline, "stage": record.get("name"),
                                       "created": time.time(), "versions": library_versions()})
        self.store.add_ref(path / TENSORS_FILE)
        self.prune(self.max_bytes)

    def entries(self) -> list[Entry]:
        """Complete entries, least recently used first."""
        out = []
        for path in (self.root / ENTRIES).glob("*"):
            try:
                info = json.loads((path / ENTRY_FILE).read_text())
            except (OSError, ValueError):
                continue
            out.append(Entry(path.name, path, info.get("record", {}), info))
        return sorted(out, key=lambda e: (e.path / ENTRY_FILE).stat().st_mtime)

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def entry_bytes(self, entry: Entry) -> int:
        own = sum(p.stat().st_size for p in entry.path.iterdir() if p.is_file())
        return own + self.store.object_bytes(manifest_objects(entry.path / TENSORS_FILE))

    def prune(self, max_bytes: int | None = None) -> dict[str, int]:
        """Evict least recently used entries until the directory fits ``max_bytes`` (None:
        evict nothing, only collect garbage; 0: evict all), then delete tensors nothing names."""
        evicted = 0
        if max_bytes is not None:
            entries = self.entries()
            while entries and self.size() > max_bytes:
                shutil.rmtree(entries.pop(0).path, ignore_errors=True)
                evicted += 1
        keep: set[str] = set()
        for manifest in self.store.live_refs():
            keep |= manifest_objects(manifest)
        freed = self.store.collect_garbage(keep)
        # half-written entries (a kill while recording) have no entry.json
        for path in (self.root / ENTRIES).glob("*"):
            if not (path / ENTRY_FILE).is_file() and time.time() - path.stat().st_mtime > 3600:
                shutil.rmtree(path, ignore_errors=True)
        return {"evicted": evicted, "freed_bytes": freed, "size": self.size()}


def _copy_tree(src: Path, dst: Path, skip: set[str] = frozenset()) -> None:
    """Copy the plain files of ``src`` into a fresh ``dst`` atomically, hard-linking (the
    files are never modified in place: every writer replaces them)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        for f in src.iterdir():
            if f.is_file() and f.name not in skip:
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        tmp.chmod(0o755)
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
