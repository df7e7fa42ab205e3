"""A content-addressed tensor store: every tensor is written once, under the hash of its bytes.

Stage outputs of one run and of many runs share it: an unchanged tensor (a rewind point carried
through five stages, the dense model two pipelines both start from) costs its bytes once.

Layout of the store's root::

    objects/<2 hex>/<64 hex>   one tensor each, a safetensors file (no pickle), zlib-compressed
    refs/<16 hex>.json         a directory whose manifest names objects here (kept alive by it)

An object's name is the SHA-256 of the tensor's dtype, shape and raw bytes, so equal tensors get
one object however they are encoded. Encodings (all exact, bit for bit; ``-0.0`` and NaN
payloads survive because values are compared as integers of the same width):

    raw       the bytes as they are
    bits      a bool tensor as packed bits (masks: 1 bit per weight, not 8)
    sparse    a packed bitmap of the nonzero entries plus those entries (pruned weights;
              +0.0 and -0.0 are both zeros, and where a -0.0 is among them a second bitmap
              over the zeros alone keeps their signs)
    table     the distinct values plus one uint8 index each (clustered weights, indices)
    shuffle   values (not in a table) stored as byte planes, which zlib compresses better

``sparse`` and ``table`` combine (a pruned, clustered layer: bitmap + one byte per kept weight).
Each encoded file is then zlib-compressed when that saves at least 5 %.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .errors import ArtifactError

OBJECTS = "objects"
REFS = "refs"
TMP_PREFIX = ".tmp."  # objects being written; renamed into place when complete
ZLIB_MAGIC = b"CPZL"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_MIN_SAVING = 0.95  # keep the compressed form only when it is at least 5 % smaller


def tensor_hash(t: torch.Tensor) -> str:
    """SHA-256 of dtype, shape and bytes: equal tensors, equal names."""
    t = t.detach().contiguous().cpu()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(_as_ints(t).numpy().tobytes())
    return h.hexdigest()


def _as_ints(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers of the same width (bool as uint8), flattened."""
    flat = t.reshape(-1)
    if t.dtype == torch.bool:
        return flat.to(torch.uint8)
    return flat.view(_INT_VIEW[t.element_size()])


def encode(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The most compact exact form of ``t``: component tensors and metadata."""
    t = t.detach().contiguous().cpu()
    meta = {"dtype": str(t.dtype).removeprefix("torch."), "shape": json.dumps(list(t.shape))}
    if t.dtype == torch.bool:
        bits = np.packbits(t.reshape(-1).numpy())
        return {"bits": torch.from_numpy(bits)}, {**meta, "encoding": "bits"}
    ints = _as_ints(t)
    parts: dict[str, torch.Tensor] = {}
    encoding = []
    values = ints
    # a pruned weight is +0.0 or -0.0 (w * 0 keeps w's sign): both are zeros of the bitmap,
    # the signs of the zeros a second bitmap over the zeros only, present when one is -0.0
    negzero = (ints == torch.iinfo(ints.dtype).min if t.is_floating_point()
               else torch.zeros_like(ints, dtype=torch.bool))
    nonzero = (ints != 0) & ~negzero
    if ints.numel() >= 64 and int(nonzero.sum()) <= ints.numel() // 2:
        parts["nonzero"] = torch.from_numpy(np.packbits(nonzero.numpy()))
        if bool(negzero.any()):
            parts["negzero"] = torch.from_numpy(np.packbits(negzero[~nonzero].numpy()))
        values = ints[nonzero]
        encoding.append("sparse")
    if values.numel() >= 64 and t.element_size() > 1:
        table, index = torch.unique(values, return_inverse=True)
        if table.numel() <= 256:
            parts["table"], values = table, index.to(torch.uint8)
            encoding.append("table")
    if "table" not in parts and values.element_size() > 1:
        # byte planes (all first bytes, then all second bytes...): float exponents repeat,
        # so zlib finds runs it cannot see in interleaved bytes (about 14 % off fp32 weights)
        width = values.element_size()
        values = values.contiguous().view(torch.uint8).reshape(-1, width).t()
        encoding.append("shuffle")
    parts["values"] = values.contiguous()
    return parts, {**meta, "encoding": "+".join(encoding) or "raw"}


def decode(parts: dict[str, torch.Tensor], meta: dict[str, str]) -> torch.Tensor:
    """Inverse of :func:`encode`."""
    dtype = getattr(torch, meta["dtype"])
    shape = json.loads(meta["shape"])
    n = int(np.prod(shape)) if shape else 1
    if meta["encoding"] == "bits":
        bits = np.unpackbits(parts["bits"].numpy(), count=n).astype(bool)
        return torch.from_numpy(bits).reshape(shape)
    ints_dtype = _INT_VIEW[torch.empty((), dtype=dtype).element_size()]
    values = parts["values"]
    if "shuffle" in meta["encoding"].split("+"):
        values = values.t().contiguous().reshape(-1).view(ints_dtype)
    if "table" in parts:
        values = parts["table"][values.long()]
    if "nonzero" in parts:
        mask = torch.from_numpy(np.unpackbits(parts["nonzero"].numpy(), count=n).astype(bool))
        full = torch.zeros(n, dtype=ints_dtype)
        full[mask] = values.to(ints_dtype)
        if "negzero" in parts:
            zeros = n - int(mask.sum())
            negative = torch.from_numpy(np.unpackbits(parts["negzero"].numpy(),
                                                      count=zeros).astype(bool))
            full[~mask] = torch.where(negative, torch.iinfo(ints_dtype).min, 0).to(ints_dtype)
        values = full
    return values.to(ints_dtype).view(dtype).reshape(shape).clone()


class TensorStore:
    """Tensors by content hash under ``root`` (created on first write)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()

    def object_path(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ArtifactError(f"{digest[:80]!r}: not a tensor store object name")
        return self.root / OBJECTS / digest[:2] / digest

    def put(self, t: torch.Tensor) -> tuple[str, bool]:
        """Store ``t``; return its hash and whether it was new."""
        digest = tensor_hash(t)
        path = self.object_path(digest)
        if path.is_file():
            os.utime(path)  # recently used objects are the last to go
            return digest, False
        parts, meta = encode(t)
        data = save_bytes(parts, metadata=meta)
        packed = zlib.compress(data, 1)  # level 6 is 3x slower for 1 % more
        if len(packed) + len(ZLIB_MAGIC) < _MIN_SAVING * len(data):
            data = ZLIB_MAGIC + packed
        _write_atomic(path, data)
        return digest, True

    def get(self, digest: str) -> torch.Tensor:
        path = self.object_path(digest)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArtifactError(f"tensor {digest[:12]} missing from the store {self.root} "
                                f"({exc.strerror}); was the cache pruned by hand?") from exc
        if data.startswith(ZLIB_MAGIC):
            data = zlib.decompress(data[len(ZLIB_MAGIC):])
        parts = load_bytes(data)
        meta = _metadata(data)
        tensor = decode(parts, meta)
        if tensor_hash(tensor) != digest:
            raise ArtifactError(f"{path}: content does not match its name (corrupt object)")
        return tensor

    def put_all(self, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
        return {name: self.put(t)[0] for name, t in tensors.items()}

    def get_all(self, names: dict[str, str]) -> dict[str, torch.Tensor]:
        cache: dict[str, torch.Tensor] = {}
        out = {}
        for name, digest in names.items():
            if digest not in cache:
                cache[digest] = self.get(digest)
            out[name] = cache[digest]  # equal tensors stay one object, as tied weights were
        return out

    def object_bytes(self, digests: set[str]) -> int:
        return sum(p.stat().st_size for d in digests if (p := self.object_path(d)).is_file())

    # -- who keeps objects alive --------------------------------------------------------------

    def add_ref(self, manifest: Path) -> None:
        """Record that ``manifest`` (a directory's tensors.json) names objects here."""
        manifest = manifest.resolve()
        name = hashlib.sha256(str(manifest).encode()).hexdigest()[:16]
        _write_atomic(self.root / REFS / f"{name}.json",
                      json.dumps({"manifest": str(manifest)}).encode())

    def live_refs(self) -> list[Path]:
        """Manifests that still exist; records of deleted directories are dropped."""
        live = []
        for ref in sorted((self.root / REFS).glob("*.json")):
            try:
                manifest = Path(json.loads(ref.read_text())["manifest"])
            except (OSError, ValueError, KeyError, TypeError):
                ref.unlink(missing_ok=True)
                continue
            if manifest.is_file():
                live.append(manifest)
            else:
                ref.unlink(missing_ok=True)
        return live

    def all_objects(self) -> dict[str, Path]:
        """Every stored object; another process's write in flight (``.tmp.*``) is not one."""
        return {p.name: p for p in (self.root / OBJECTS).glob("??/*")
                if not p.name.startswith(TMP_PREFIX) and p.is_file()}

    def collect_garbage(self, keep: set[str], min_age_s: float = 600.0) -> int:
        """Delete every object not in ``keep`` and untouched for ``min_age_s`` (another process
        may have just written one whose directory it has not yet recorded); return the bytes
        freed."""
        freed = 0
        now = time.time()
        for digest, path in self.all_objects().items():
            try:  # a concurrent collector may have removed it since the listing
                stat = path.stat()
            except FileNotFoundError:
                continue
            if digest not in keep and now - stat.st_mtime >= min_age_s:
                freed += stat.st_size
                path.unlink(missing_ok=True)
        return freed


def manifest_objects(manifest: Path) -> set[str]:
    """Object names a manifest refers to (empty when unreadable)."""
    try:
        data: Any = json.loads(manifest.read_text())
        return {d for group in data["tensors"].values() for d in group.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of serialized safetensors bytes (header only)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + n])
    return header.get("__metadata__", {})


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
