"""The version-2 section table: a compact binary description of every tensor, and the
compressed blocks that hold it and the metadata.

Each block (metadata, section table) starts with a codec byte (raw, zlib, lzma; the writer
keeps the smallest). The table is a sequence of varints and bytes (docs/format.md, section 3b);
blob offsets are not stored: blobs follow each other in table order from payload offset 0, so
they tile the payload by construction and only stream lengths need storing (every other length
follows from a shape and a dtype). :func:`pack_table` writes it from :class:`TensorEncoding`
records, :func:`parse_table` reads it back into :class:`Entry` records, checking everything the
JSON table of version 1 checks.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Iterable

import numpy as np

from .container import (
    BLOCK_CODECS,
    DTYPE_CODES,
    DTYPES,
    FLOAT_DTYPES,
    INT_DTYPES,
    KINDS,
    MAX_CODEBOOK,
    MAX_ESCAPE_BITS,
    MAX_NAME_LEN,
    MAX_NDIM,
    POSITION_METHODS,
    name_problem,
)
from .encode import TensorEncoding
from .specs import ArraySpec, Blob, Entry, PositionsSpec, StreamSpec, check_stream, fail, section
from .streams import HuffmanStream

MAX_INFLATED = 1 << 26  # a metadata or table block never inflates beyond 64 MiB
_METHOD_CODES = (None, *POSITION_METHODS)  # 0: dense

# --------------------------------------------------------------------------- blocks


def pack_block(data: bytes) -> bytes:
    """``data`` behind a codec byte, with whichever codec makes it smallest."""
    options = [b"\x00" + data, b"\x01" + zlib.compress(data, 9),
               b"\x02" + lzma.compress(data, format=lzma.FORMAT_XZ, preset=6)]
    return min(options, key=len)


def parse_block(raw: memoryview | bytes, where: str) -> bytes:
    """The bytes of a block, inflated (at most :data:`MAX_INFLATED`)."""
    if len(raw) < 1 or raw[0] >= len(BLOCK_CODECS):
        raise fail(where, f"unknown codec {raw[0] if len(raw) else None!r}")
    body = bytes(raw[1:])
    if raw[0] == 0:
        return body
    try:
        if raw[0] == 1:
            inflate = zlib.decompressobj()
            out = inflate.decompress(body, MAX_INFLATED)
            complete = inflate.eof and not inflate.unconsumed_tail and not inflate.unused_data
        else:
            unxz = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            out = unxz.decompress(body, MAX_INFLATED)
            complete = unxz.eof and not unxz.unused_data
    except (zlib.error, lzma.LZMAError, EOFError) as exc:
        raise fail(where, f"corrupt {BLOCK_CODECS[raw[0]]} block: {exc}") from exc
    with section(where):
        if not complete:
            raise ValueError(f"not one complete {BLOCK_CODECS[raw[0]]} stream inflating to at "
                             f"most {MAX_INFLATED} bytes")
        return out


# --------------------------------------------------------------------------- writing


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _shape_bytes(shape: Iterable[int]) -> bytes:
    shape = list(shape)
    return _varint(len(shape)) + b"".join(_varint(int(d)) for d in shape)


def _stream_bytes(stream: HuffmanStream, blobs: list[bytes]) -> bytes:
    data = stream.to_bytes()
    blobs.append(data)
    return (_varint(stream.count) + bytes([stream.group, stream.block_size.bit_length() - 1,
                                           stream.width]) + _varint(len(data)))


def _le(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr, dtype=DTYPES[arr.dtype.name]).tobytes()


def _entry_bytes(name: str, enc: TensorEncoding, blobs: list[bytes]) -> bytes:
    raw_name = name.encode("utf-8")
    out = [_varint(len(raw_name)), raw_name,
           bytes([KINDS.index(enc.kind), DTYPE_CODES.index(enc.dtype)]), _shape_bytes(enc.shape)]
    if enc.kind == "raw":
        blobs.append(_le(enc.values))
        return b"".join(out)
    if enc.kind == "clustered":
        book = enc.arrays["codebook"]
        out += [_varint(book.size), _varint(0 if enc.zero_index is None else enc.zero_index + 1)]
        blobs.append(_le(book))
    else:
        out.append(_varint(0 if enc.axis is None else enc.axis + 1))
        for key in ("scale", "zero_point"):
            arr = enc.arrays[key]
            out += [bytes([DTYPE_CODES.index(arr.dtype.name)]), _shape_bytes(arr.shape)]
            blobs.append(_le(arr))
    pos = enc.positions
    if pos is None:
        out.append(b"\x00")
    else:
        out += [bytes([_METHOD_CODES.index(pos.method)]), _varint(pos.count)]
        if pos.stream is None:
            blobs.append(pos.bitmap)
        else:
            out += [bytes([pos.bits]), _stream_bytes(pos.stream, blobs)]
    out.append(_stream_bytes(enc.values, blobs))
    return b"".join(out)


def pack_table(tensors: Iterable[tuple[str, TensorEncoding]]) -> tuple[bytes, list[bytes]]:
    """The binary section table of these tensors, and their blobs in payload order."""
    tensors = list(tensors)
    blobs: list[bytes] = []
    parts = [_varint(len(tensors))]
    parts += [_entry_bytes(name, enc, blobs) for name, enc in tensors]
    return b"".join(parts), blobs


# --------------------------------------------------------------------------- reading


class _Cursor:
    """Reads the table front to back; every read is bounds-checked."""

    def __init__(self, data: bytes, payload_size: int) -> None:
        self.data, self.pos = data, 0
        self.payload_size, self.offset = payload_size, 0

    def u8(self, where: str) -> int:
        if self.pos >= len(self.data):
            raise fail(where, "section table ends early")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self, hi: int, where: str) -> int:
        value = shift = 0
        while True:
            byte = self.u8(where)
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
            if shift > 63:
                raise fail(where, "varint longer than 9 bytes")
        if value > hi:
            raise fail(where, f"expected at most {hi}, got {value}")
        return value

    def take(self, n: int, where: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise fail(where, "section table ends early")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def blob(self, length: int, where: str) -> Blob:
        """The next ``length`` bytes of the payload."""
        if length > self.payload_size - self.offset:
            raise fail(where, f"needs {length} bytes, the payload has "
                       f"{self.payload_size - self.offset} left")
        self.offset += length
        return Blob(self.offset - length, length, None)

    def dtype(self, allowed: set[str], where: str) -> np.dtype:
        code = self.u8(where)
        if code >= len(DTYPE_CODES) or DTYPE_CODES[code] not in allowed:
            raise fail(where, f"unsupported dtype code {code}")
        return DTYPES[DTYPE_CODES[code]]

    def shape(self, where: str) -> tuple[tuple[int, ...], int]:
        dims = tuple(self.varint(1 << 62, f"{where}: shape")
                     for _ in range(self.varint(MAX_NDIM, f"{where}: rank")))
        size = 1
        for d in dims:
            size *= d
        return dims, size

    def stream(self, alphabet: int, where: str) -> StreamSpec:
        count = self.varint(1 << 62, f"{where}: count")
        group, log_block, width = self.u8(where), self.u8(where), self.u8(where)
        if group not in (1, 2) or log_block > 16:
            raise fail(where, f"group {group} or block size 2**{log_block} out of range")
        blob = self.blob(self.varint(self.payload_size, f"{where}: length"), where)
        return check_stream(StreamSpec(count, alphabet, group, 1 << log_block, width, blob),
                            alphabet, where)


def _positions(cur: _Cursor, size: int, where: str) -> PositionsSpec | None:
    code = cur.u8(where)
    if code >= len(_METHOD_CODES):
        raise fail(where, f"unknown positions method {code}")
    method = _METHOD_CODES[code]
    if method is None:
        return None
    count = cur.varint(size, f"{where}: count")
    if method == "bitmap":
        return PositionsSpec(method, count, 0, None, cur.blob((size + 7) // 8, where))
    bits = cur.u8(where)
    if not 1 <= bits <= MAX_ESCAPE_BITS:
        raise fail(f"{where}: bits", f"must lie in [1, {MAX_ESCAPE_BITS}]")
    return PositionsSpec(method, count, bits, cur.stream(1 << bits, where), None)


def _array(cur: _Cursor, dtype: np.dtype, shape: tuple[int, ...], size: int,
           where: str) -> ArraySpec:
    return ArraySpec(dtype, shape, cur.blob(size * dtype.itemsize, where))


def _coded_side(cur: _Cursor, kind: str, dtype: np.dtype, shape: tuple[int, ...],
                where: str) -> tuple[dict[str, ArraySpec], int | None, int | None, int]:
    """The side arrays, zero index, axis and value alphabet of a clustered or int8 entry."""
    if kind == "clustered":
        if dtype.name not in INT_DTYPES:
            raise fail(where, f"unsupported dtype {dtype.name}")
        k = cur.varint(MAX_CODEBOOK, f"{where}: codebook")
        if k < 1 or np.iinfo(dtype).max < k - 1:
            raise fail(where, f"{k} clusters do not fit dtype {dtype.name}")
        zero = cur.varint(k, f"{where}: zero_index")
        book = _array(cur, DTYPES["float32"], (k,), k, f"{where}: codebook")
        return {"codebook": book}, (zero - 1 if zero else None), None, k
    if dtype.name != "int8":
        raise fail(where, f"unsupported dtype {dtype.name}")
    axis = cur.varint(len(shape), f"{where}: axis")
    channels = shape[axis - 1] if axis else 1
    arrays = {}
    for key, allowed in (("scale", FLOAT_DTYPES), ("zero_point", INT_DTYPES)):
        side_dtype = cur.dtype(allowed, f"{where}: {key}")
        side_shape, side_size = cur.shape(f"{where}: {key}")
        if side_size != channels:
            raise fail(f"{where}: {key}", f"needs {channels} entries for axis "
                       f"{axis - 1 if axis else None}")
        arrays[key] = _array(cur, side_dtype, side_shape, side_size, f"{where}: {key}")
    return arrays, None, (axis - 1 if axis else None), 256


def _entry(cur: _Cursor, index: int) -> Entry:
    where = f"section table: tensor #{index}"
    raw_name = cur.take(cur.varint(4 * MAX_NAME_LEN, f"{where}: name"), f"{where}: name")
    with section(f"{where}: name"):
        name = raw_name.decode("utf-8")
    problem = name_problem(name)
    if problem:
        raise fail(where, f"bad tensor name {name!r:.80}: {problem}")
    where = f"tensor {name!r}"
    kind_code = cur.u8(where)
    if kind_code >= len(KINDS):
        raise fail(where, f"unknown kind {kind_code}")
    kind = KINDS[kind_code]
    dtype = cur.dtype(set(DTYPES), where)
    shape, size = cur.shape(where)
    if kind == "raw":
        values = cur.blob(size * dtype.itemsize, f"{where}: values")
        return Entry(name, kind, shape, dtype, size, None, None, {}, None, values)
    arrays, zero_index, axis, alphabet = _coded_side(cur, kind, dtype, shape, where)
    positions = _positions(cur, size, f"{where}: positions")
    if positions is not None and kind == "clustered" and zero_index is None:
        raise fail(f"{where}: positions", "present but zero_index is null")
    values = cur.stream(alphabet, f"{where}: values stream")
    expected = size if positions is None else positions.count
    if values.count != expected:
        raise fail(f"{where}: values stream", f"holds {values.count} symbols, expected {expected}")
    return Entry(name, kind, shape, dtype, size, zero_index, axis, arrays, positions, values)


def parse_table(data: bytes, payload_size: int) -> list[Entry]:
    """The entries of a binary section table; their blobs tile the payload from offset 0."""
    cur = _Cursor(data, payload_size)
    # each entry takes at least 5 bytes, which bounds the count by the table size
    entries = [_entry(cur, i) for i in range(cur.varint(len(data) // 5, "section table: count"))]
    if cur.pos != len(data):
        raise fail("section table", f"{len(data) - cur.pos} bytes after the last tensor")
    return entries
