"""Writing a ``.cpz`` file: :func:`pack_cpz` and :func:`write_cpz`.

:func:`pack_cpz` lays out the header, the metadata and section-table sections, the payload
(every array and stream as a blob the table describes) and the blake2b digest of it all.
Version 2 (the default) writes a compressed binary table (:mod:`.table`) and compressed
metadata; version 1, the JSON table with an offset, length and crc32 per blob, is still
written on request (for readers that know only version 1, and for tests of the v1 reader).
:func:`write_cpz` writes the bytes atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .container import (
    DIGEST_SIZE,
    DTYPES,
    HEADER,
    JSON_VERSION,
    MAGIC,
    SECTION,
    VERSION,
    name_problem,
)
from .encode import TensorEncoding
from .streams import HuffmanStream
from .table import pack_block, pack_table


class _Payload:
    """Concatenates blobs and describes each one for the section table."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> dict[str, int]:
        ref = {"offset": self.size, "length": len(data), "crc32": zlib.crc32(data)}
        self.parts.append(data)
        self.size += len(data)
        return ref


def _array_entry(payload: _Payload, arr: np.ndarray) -> dict[str, Any]:
    le = np.ascontiguousarray(arr, dtype=DTYPES[arr.dtype.name])
    return {
        "dtype": arr.dtype.name,
        "shape": [int(d) for d in arr.shape],
        "blob": payload.add(le.tobytes()),
    }


def _stream_entry(payload: _Payload, stream: HuffmanStream) -> dict[str, Any]:
    return {**stream.descriptor(), "blob": payload.add(stream.to_bytes())}


def _tensor_entry(payload: _Payload, name: str, enc: TensorEncoding) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "kind": enc.kind,
        "shape": list(enc.shape),
        "dtype": enc.dtype,
    }
    if enc.kind == "clustered":
        entry["zero_index"] = enc.zero_index
        entry["codebook"] = _array_entry(payload, enc.arrays["codebook"])
    elif enc.kind == "int8":
        entry["axis"] = enc.axis
        entry["scale"] = _array_entry(payload, enc.arrays["scale"])
        entry["zero_point"] = _array_entry(payload, enc.arrays["zero_point"])
    if enc.kind == "raw":
        entry["values"] = {"coding": "raw", "blob": _array_entry(payload, enc.values)["blob"]}
        return entry
    pos = enc.positions
    if pos is None:
        entry["positions"] = None
    elif pos.stream is None:
        entry["positions"] = {
            "method": pos.method,
            "count": pos.count,
            "blob": payload.add(pos.bitmap),
        }
    else:
        entry["positions"] = {
            "method": pos.method,
            "count": pos.count,
            "bits": pos.bits,
            "stream": _stream_entry(payload, pos.stream),
        }
    entry["values"] = _stream_entry(payload, enc.values)
    return entry


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not strict JSON: {exc}") from exc
    return text.encode("utf-8")


def pack_cpz(tensors: Mapping[str, TensorEncoding], metadata: Mapping[str, Any],
             version: int = VERSION) -> bytes:
    """Serialize encoded tensors and a JSON-serializable metadata dict to .cpz bytes."""
    if not isinstance(metadata, Mapping):
        raise TypeError("metadata must be a mapping")
    if version not in (JSON_VERSION, VERSION):
        raise ValueError(f"cannot write format version {version}")
    for name, enc in tensors.items():
        problem = name_problem(name)
        if problem:
            raise ValueError(f"tensor name {name!r}: {problem}")
        if not isinstance(enc, TensorEncoding):
            raise TypeError(f"tensor {name!r}: expected a TensorEncoding, got {type(enc).__name__}")
    meta = _json_bytes(dict(metadata), "metadata")
    if version == VERSION:
        table, blobs = pack_table(tensors.items())
        meta, table = pack_block(meta), pack_block(table)
    else:
        payload = _Payload()
        entries = [_tensor_entry(payload, name, enc) for name, enc in tensors.items()]
        table, blobs = _json_bytes({"tensors": entries}, "section table"), payload.parts
    size = sum(len(b) for b in blobs)
    total = HEADER.size + 2 * SECTION.size + len(meta) + len(table) + size + DIGEST_SIZE
    parts = [
        HEADER.pack(MAGIC, version, 0, total),
        SECTION.pack(len(meta), zlib.crc32(meta)),
        meta,
        SECTION.pack(len(table), zlib.crc32(table)),
        table,
        *blobs,
    ]
    body = b"".join(parts)
    return body + hashlib.blake2b(body, digest_size=DIGEST_SIZE).digest()


def write_cpz(
    path: str | os.PathLike, tensors: Mapping[str, TensorEncoding], metadata: Mapping[str, Any],
    version: int = VERSION,
) -> int:
    """Write a .cpz file atomically (temp file in the same directory, then rename); return its size."""
    data = pack_cpz(tensors, metadata, version)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a model file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)
