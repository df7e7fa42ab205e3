"""Reading the structure of a ``.cpz`` file, before anything is decoded.

:func:`parse` checks the header, the file digest, the metadata and section-table JSON
sections and every entry of the table against the format's limits, and returns the metadata,
one :class:`Entry` per tensor (with :class:`ArraySpec`, :class:`StreamSpec`,
:class:`PositionsSpec` and :class:`Blob` references into the payload, all in bounds and
tiling it exactly) and the payload. The input is hostile: :func:`section` and :func:`fail`
turn every problem into a :class:`CpzFormatError` that names the section at fault.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import huffman
from .container import (
    DIGEST_SIZE,
    DTYPES,
    FLOAT_DTYPES,
    HEADER,
    INT_DTYPES,
    MAGIC,
    MAX_CODEBOOK,
    MAX_ESCAPE_BITS,
    MAX_NDIM,
    MAX_PAIR_ALPHABET,
    MIN_FILE,
    POSITION_METHODS,
    SECTION,
    VERSION,
    VERSIONS,
    name_problem,
)
from .specs import ArraySpec, Blob, Entry, PositionsSpec, StreamSpec, fail, section
from .table import parse_block, parse_table

__all__ = ["ArraySpec", "Blob", "Entry", "PositionsSpec", "StreamSpec", "fail", "parse",
           "section"]


@dataclass(frozen=True)
class _Parsed:
    metadata: dict[str, Any]
    entries: list[Entry]
    payload: memoryview
    # bytes of the container's own parts: header, metadata, section table, digest
    layout: dict[str, int] = field(default_factory=dict)
    version: int = VERSION


def _keys(obj: object, required: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise fail(where, f"expected an object, got {type(obj).__name__}")
    if set(obj) != required:
        missing, extra = sorted(required - set(obj)), sorted(set(obj) - required)
        raise fail(where, f"missing keys {missing}" if missing else f"unexpected keys {extra}")
    return obj


def _int(value: object, lo: int, hi: int, where: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise fail(where, f"expected an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


def _dtype(value: object, allowed: set[str], where: str) -> np.dtype:
    if not isinstance(value, str) or value not in allowed:
        raise fail(where, f"unsupported dtype {value!r:.40}")
    return DTYPES[value]


def _shape(value: object, where: str) -> tuple[tuple[int, ...], int]:
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        raise fail(where, f"shape must be a list of at most {MAX_NDIM} sizes")
    dims = tuple(_int(d, 0, 1 << 62, f"{where}: shape") for d in value)
    size = 1
    for d in dims:
        size *= d  # Python ints: no overflow, and each factor is capped
    return dims, size


def _blob(value: object, payload_size: int, where: str) -> Blob:
    obj = _keys(value, {"offset", "length", "crc32"}, where)
    offset = _int(obj["offset"], 0, payload_size, where)
    length = _int(obj["length"], 0, payload_size - offset, where)
    return Blob(offset, length, _int(obj["crc32"], 0, 0xFFFFFFFF, where))


def _array_spec(value: object, allowed: set[str], payload_size: int, where: str) -> ArraySpec:
    obj = _keys(value, {"dtype", "shape", "blob"}, where)
    dtype = _dtype(obj["dtype"], allowed, where)
    shape, size = _shape(obj["shape"], where)
    blob = _blob(obj["blob"], payload_size, where)
    if blob.length != size * dtype.itemsize:
        raise fail(where, f"{blob.length} bytes cannot hold {size} x {dtype.name}")
    return ArraySpec(dtype, shape, blob)


def _stream_spec(value: object, alphabet: int | None, payload_size: int, where: str) -> StreamSpec:
    keys = {"coding", "count", "alphabet", "group", "block_size", "width", "blob"}
    obj = _keys(value, keys, where)
    if obj["coding"] != "huffman":
        raise fail(where, f"unknown coding {obj['coding']!r:.40}")
    blob = _blob(obj["blob"], payload_size, where)
    group = _int(obj["group"], 1, 2, f"{where}: group")
    spec = StreamSpec(
        # Every code is at least one bit, which bounds the decoded size by the blob size.
        count=_int(obj["count"], 0, 8 * group * blob.length, f"{where}: count"),
        alphabet=_int(obj["alphabet"], 1, huffman.MAX_ALPHABET, f"{where}: alphabet"),
        group=group,
        block_size=_int(
            obj["block_size"],
            huffman.MIN_BLOCK_SIZE,
            huffman.MAX_BLOCK_SIZE,
            f"{where}: block_size",
        ),
        width=_int(obj["width"], 2, 4, f"{where}: width"),
        blob=blob,
    )
    if spec.width == 3 or spec.block_size & (spec.block_size - 1):
        raise fail(where, "block size must be a power of two and width 2 or 4")
    if alphabet is not None and spec.alphabet != alphabet:
        raise fail(where, f"alphabet {spec.alphabet}, expected {alphabet}")
    if spec.group == 2 and spec.alphabet**2 > MAX_PAIR_ALPHABET:
        raise fail(where, f"pairs of a {spec.alphabet}-symbol alphabet exceed {MAX_PAIR_ALPHABET}")
    if blob.length < spec.table_bytes:
        raise fail(where, f"{blob.length} bytes cannot hold the code and block tables")
    return spec


def _positions_spec(
    value: object, size: int, payload_size: int, where: str
) -> PositionsSpec | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("method") not in POSITION_METHODS:
        raise fail(where, "expected null or an object with method relidx, runs or bitmap")
    if value["method"] == "bitmap":
        obj = _keys(value, {"method", "count", "blob"}, where)
        blob = _blob(obj["blob"], payload_size, where)
        if blob.length != (size + 7) // 8:
            raise fail(where, f"bitmap of {blob.length} bytes for {size} elements")
        return PositionsSpec(
            "bitmap", _int(obj["count"], 0, size, f"{where}: count"), 0, None, blob
        )
    obj = _keys(value, {"method", "count", "bits", "stream"}, where)
    bits = _int(obj["bits"], 1, MAX_ESCAPE_BITS, f"{where}: bits")
    stream = _stream_spec(obj["stream"], 1 << bits, payload_size, where)
    return PositionsSpec(
        obj["method"], _int(obj["count"], 0, size, f"{where}: count"), bits, stream, None
    )


_ENTRY_KEYS = {
    "clustered": {
        "name",
        "kind",
        "shape",
        "dtype",
        "zero_index",
        "codebook",
        "positions",
        "values",
    },
    "int8": {
        "name",
        "kind",
        "shape",
        "dtype",
        "axis",
        "scale",
        "zero_point",
        "positions",
        "values",
    },
    "raw": {"name", "kind", "shape", "dtype", "values"},
}


def _clustered_side(obj: dict[str, Any], arrays: dict[str, ArraySpec], payload_size: int,
                    where: str) -> tuple[np.dtype, int, int | None]:
    """A clustered entry's index dtype, codebook (into ``arrays``), alphabet and zero index."""
    dtype = _dtype(obj["dtype"], INT_DTYPES, where)
    arrays["codebook"] = _array_spec(
        obj["codebook"], {"float32"}, payload_size, f"{where}: codebook"
    )
    alphabet = arrays["codebook"].blob.length // 4
    if len(arrays["codebook"].shape) != 1 or not 1 <= alphabet <= MAX_CODEBOOK:
        raise fail(f"{where}: codebook", f"must be 1-D with 1..{MAX_CODEBOOK} entries")
    if np.iinfo(dtype).max < alphabet - 1:
        raise fail(where, f"dtype {dtype.name} cannot hold {alphabet} clusters")
    zero_index = None
    if obj["zero_index"] is not None:
        zero_index = _int(obj["zero_index"], 0, alphabet - 1, f"{where}: zero_index")
    return dtype, alphabet, zero_index


def _int8_side(obj: dict[str, Any], shape: tuple[int, ...], arrays: dict[str, ArraySpec],
               payload_size: int, where: str) -> tuple[np.dtype, int | None]:
    """An int8 entry's dtype, channel axis and per-channel scale and zero point (into
    ``arrays``)."""
    dtype = _dtype(obj["dtype"], {"int8"}, where)
    axis = None
    if obj["axis"] is not None:
        axis = _int(obj["axis"], 0, len(shape) - 1, f"{where}: axis")
    channels = 1 if axis is None else shape[axis]
    arrays["scale"] = _array_spec(obj["scale"], FLOAT_DTYPES, payload_size, f"{where}: scale")
    arrays["zero_point"] = _array_spec(
        obj["zero_point"], INT_DTYPES, payload_size, f"{where}: zero_point"
    )
    for key, spec in arrays.items():
        if spec.blob.length != channels * spec.dtype.itemsize:
            raise fail(f"{where}: {key}", f"needs {channels} entries for axis {axis}")
    return dtype, axis


def _entry(value: object, payload_size: int, where: str) -> Entry:
    if not isinstance(value, dict):
        raise fail(where, "expected an object")
    name = value.get("name")
    problem = name_problem(name)
    if problem:
        raise fail(where, f"bad tensor name {name!r:.80}: {problem}")
    where = f"tensor {name!r}"
    kind = value.get("kind")
    if kind not in _ENTRY_KEYS:
        raise fail(where, f"unknown kind {kind!r:.40}")
    obj = _keys(value, _ENTRY_KEYS[kind], where)
    shape, size = _shape(obj["shape"], where)
    arrays: dict[str, ArraySpec] = {}
    zero_index = axis = None
    alphabet = 256
    if kind == "clustered":
        dtype, alphabet, zero_index = _clustered_side(obj, arrays, payload_size, where)
    elif kind == "int8":
        dtype, axis = _int8_side(obj, shape, arrays, payload_size, where)
    else:
        dtype = _dtype(obj["dtype"], set(DTYPES), where)
    if kind == "raw":
        values_obj = _keys(obj["values"], {"coding", "blob"}, f"{where}: values")
        if values_obj["coding"] != "raw":
            raise fail(f"{where}: values", f"unknown coding {values_obj['coding']!r:.40}")
        values: StreamSpec | Blob = _blob(values_obj["blob"], payload_size, f"{where}: values")
        if values.length != size * dtype.itemsize:
            raise fail(
                f"{where}: values", f"{values.length} bytes cannot hold {size} x {dtype.name}"
            )
        positions = None
    else:
        positions = _positions_spec(obj["positions"], size, payload_size, f"{where}: positions")
        values = _stream_spec(obj["values"], alphabet, payload_size, f"{where}: values stream")
        if positions is not None and kind == "clustered" and zero_index is None:
            raise fail(f"{where}: positions", "present but zero_index is null")
        expected = size if positions is None else positions.count
        if values.count != expected:
            raise fail(
                f"{where}: values stream", f"holds {values.count} symbols, expected {expected}"
            )
    return Entry(name, kind, shape, dtype, size, zero_index, axis, arrays, positions, values)


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _block(buf: memoryview, offset: int, where: str) -> tuple[memoryview, int]:
    """One length + crc32 + bytes section at ``offset``: its bytes and the next offset."""
    if offset + SECTION.size > len(buf):
        raise fail(where, "truncated")
    length, crc = SECTION.unpack_from(buf, offset)
    start = offset + SECTION.size
    if length > len(buf) - start:
        raise fail(where, f"length {length} runs past the end of the file")
    raw = buf[start : start + length]
    if zlib.crc32(raw) != crc:
        raise fail(where, "checksum mismatch")
    return raw, start + length


def _json(raw: bytes | memoryview, where: str) -> Any:
    with section(where):
        return json.loads(
            bytes(raw).decode("utf-8"),
            object_pairs_hook=_strict_object,
            parse_constant=_reject_constant,
        )


def _header(buf: memoryview) -> int:
    """Check magic, version, flags, length and digest; return the version."""
    if len(buf) < MIN_FILE:
        raise fail("header", f"file of {len(buf)} bytes is too short to be a .cpz file")
    magic, version, flags, declared = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise fail("header", f"bad magic {bytes(magic)!r}, not a .cpz file")
    if version not in VERSIONS:
        raise fail(
            "header",
            f"format version {version} is not supported (this reader handles versions "
            f"{', '.join(map(str, VERSIONS))}; a newer compresspipe may read it)",
        )
    if flags != 0:
        raise fail("header", f"unknown flags 0x{flags:04x}")
    if declared != len(buf):
        raise fail(
            "header", f"file is {len(buf)} bytes but its header says {declared} (truncated?)"
        )
    body = buf[:-DIGEST_SIZE]
    if hashlib.blake2b(body, digest_size=DIGEST_SIZE).digest() != bytes(buf[-DIGEST_SIZE:]):
        raise fail("file", "checksum mismatch")
    return version


def parse(data: bytes | bytearray | memoryview, max_elements: int) -> _Parsed:
    """Check the header, checksums and section table; decode nothing yet."""
    buf = memoryview(data).cast("B")
    version = _header(buf)
    body = buf[:-DIGEST_SIZE]
    meta_raw, offset = _block(body, HEADER.size, "metadata")
    table_raw, offset = _block(body, offset, "section table")
    payload = body[offset:]
    if version == VERSION:
        metadata = _json(parse_block(meta_raw, "metadata"), "metadata")
    else:
        metadata = _json(meta_raw, "metadata")
    if not isinstance(metadata, dict):
        raise fail("metadata", "must be a JSON object")
    if version == VERSION:
        entries = parse_table(parse_block(table_raw, "section table"), len(payload))
    else:
        table = _keys(_json(table_raw, "section table"), {"tensors"}, "section table")
        if not isinstance(table["tensors"], list):
            raise fail("section table", "tensors must be a list")
        entries = [
            _entry(e, len(payload), f"section table: tensor #{i}")
            for i, e in enumerate(table["tensors"])
        ]
    _check_entries(entries, len(payload), max_elements)
    layout = {"header": HEADER.size, "metadata": SECTION.size + len(meta_raw),
              "section_table": SECTION.size + len(table_raw), "digest": DIGEST_SIZE}
    return _Parsed(metadata, entries, payload, layout, version)


def _check_entries(entries: list[Entry], payload_size: int, max_elements: int) -> None:
    names: set[str] = set()
    total = 0
    for e in entries:
        if e.name in names:
            raise fail(f"tensor {e.name!r}", "duplicate name")
        names.add(e.name)
        total += e.size
        if total > max_elements:
            raise fail(
                f"tensor {e.name!r}", f"tensors hold more than max_elements={max_elements} elements"
            )
    # Blobs must tile the payload exactly: no overlaps (each byte decodes once, which
    # bounds total work by the file size) and no unaccounted bytes.
    blobs = sorted((b.offset, b.length, e.name) for e in entries for b in e.blobs())
    end = 0
    for offset, length, name in blobs:
        if offset != end:
            problem = "overlaps another blob" if offset < end else "leaves a gap in the payload"
            raise fail(f"tensor {name!r}", f"blob at payload offset {offset} {problem}")
        end = offset + length
    if end != payload_size:
        raise fail("section table", f"blobs cover {end} of {payload_size} payload bytes")
