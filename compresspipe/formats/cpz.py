"""The ``.cpz`` container: Deep Compression's entropy-coded stage as a file format.

A ``.cpz`` file holds named tensors, each as sparse positions plus cluster indices,
int8 codes or raw floats, every integer stream Huffman-coded with its own canonical
code, and an opaque JSON metadata dict. The byte layout is specified in docs/format.md.
Everything here is numpy + stdlib; the reader treats its input as hostile and raises
only :class:`CpzFormatError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from . import huffman

MAGIC = b"CPZ\x00"
VERSION = 1
_HEADER = struct.Struct("<4sHHQ")  # magic, version, flags, file length
_SECTION = struct.Struct("<II")  # length, crc32 of a JSON block
_DIGEST_SIZE = 32  # blake2b-256 trailer
_MIN_FILE = _HEADER.size + 2 * _SECTION.size + _DIGEST_SIZE

WRITE_MAX_CODE_LEN = 16
"""Writers limit codes to 16 bits so the decoder's 2**16-entry table always resolves a code."""
MAX_NDIM = 32
MAX_CODEBOOK = 1 << 16
MAX_NAME_LEN = 1024
MAX_ESCAPE_BITS = 16
MAX_PAIR_ALPHABET = 1 << 16
DEFAULT_MAX_ELEMENTS = 1 << 32
"""Default cap on the total elements a reader will materialize (sparse tensors decode to
far more bytes than they occupy, so the file size alone cannot bound them)."""

_DTYPES = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}
_INT_DTYPES = {k for k, v in _DTYPES.items() if v.kind in "iu"}
_FLOAT_DTYPES = {k for k, v in _DTYPES.items() if v.kind == "f"}
_POSITION_METHODS = ("relidx", "runs", "bitmap")


class CpzFormatError(ValueError):
    """A .cpz file is truncated, corrupt, of another version or otherwise malformed.

    The message starts with the section at fault, e.g.
    ``tensor 'fc.weight': values stream: checksum mismatch``.
    """


# --------------------------------------------------------------------------- decoded tensors


@dataclass(frozen=True, eq=False)
class ClusteredTensor:
    """Cluster indices into a float32 codebook; ``zero_index`` marks pruned entries."""

    indices: np.ndarray
    codebook: np.ndarray
    zero_index: int | None = 0

    def to_dense(self) -> np.ndarray:
        """The float32 weight ``codebook[indices]`` (zeros where indices == zero_index)."""
        return self.codebook[self.indices]


@dataclass(frozen=True, eq=False)
class Int8Tensor:
    """Affine int8 codes: ``(q - zero_point) * scale``, per tensor (axis None) or per ``axis``."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    def to_dense(self) -> np.ndarray:
        """The dequantized float32 weight."""
        shape = [1] * self.q.ndim
        if self.axis is not None:
            shape[self.axis] = -1
        scale = np.asarray(self.scale, dtype=np.float32).reshape(shape)
        zp = np.asarray(self.zero_point, dtype=np.float32).reshape(shape)
        return ((self.q.astype(np.float32) - zp) * scale).astype(np.float32, copy=False)


@dataclass(frozen=True, eq=False)
class RawTensor:
    """A tensor stored as-is (biases, norms, anything small)."""

    array: np.ndarray

    def to_dense(self) -> np.ndarray:
        """The array as float32."""
        return self.array.astype(np.float32)


CpzTensor = Union[ClusteredTensor, Int8Tensor, RawTensor]  # noqa: UP007 - a runtime alias


# --------------------------------------------------------------------------- encoded streams


@dataclass(frozen=True, eq=False)
class HuffmanStream:
    """One canonical-Huffman-coded stream of ``count`` symbols in [0, alphabet).

    With ``group`` 2, pairs of symbols ``(a, b)`` are coded as one symbol ``a * alphabet + b``
    (an odd stream is padded with a 0): Huffman wastes up to ~0.05 bit per code on skewed
    histograms like cluster indices, and coding pairs halves that per symbol.
    """

    count: int
    alphabet: int
    group: int
    lengths: np.ndarray  # uint8 code length per coded symbol (alphabet ** group entries)
    block_size: int
    block_offsets: np.ndarray  # int64 bit offset of each block, then the total
    data: bytes

    @classmethod
    def from_symbols(
        cls, symbols: np.ndarray, alphabet: int, group: int | None = None
    ) -> HuffmanStream:
        """Code ``symbols`` (ints in [0, alphabet)) optimally; ``group`` None picks the smaller."""
        symbols = np.asarray(symbols).reshape(-1)
        if symbols.size and (int(symbols.min()) < 0 or int(symbols.max()) >= alphabet):
            raise ValueError(f"symbols must lie in [0, {alphabet})")
        if group is None:
            group = _stream_choice(symbols, alphabet)[1]
        limit = {1: MAX_CODEBOOK, 2: MAX_PAIR_ALPHABET}.get(group, 0)
        if alphabet**group > limit:
            raise ValueError(
                f"cannot code {group} symbol(s) of a {alphabet}-symbol alphabet at once"
            )
        coded = _grouped(symbols, alphabet, group)
        lengths = huffman.code_lengths(_histogram(coded, alphabet**group), WRITE_MAX_CODE_LEN)
        block_size = huffman.choose_block_size(coded.size)
        data, offsets = huffman.encode(coded, lengths, block_size)
        return cls(int(symbols.size), alphabet, group, lengths, block_size, offsets, data)

    @property
    def width(self) -> int:
        """Bytes per block-length entry."""
        return _block_width(self.block_size, int(self.lengths.max(initial=0)))

    @property
    def table_bytes(self) -> int:
        """Bytes of code lengths plus block table."""
        return self.lengths.size + (self.block_offsets.size - 1) * self.width

    @property
    def nbytes(self) -> int:
        return self.table_bytes + len(self.data)

    def to_bytes(self) -> bytes:
        spans = np.diff(self.block_offsets).astype(f"<u{self.width}")
        return self.lengths.astype(np.uint8).tobytes() + spans.tobytes() + self.data

    def decode(self) -> np.ndarray:
        coded = huffman.decode(
            self.data,
            self.lengths,
            -(-self.count // self.group),
            self.block_offsets,
            self.block_size,
        )
        return _ungrouped(coded, self.alphabet, self.group, self.count)

    def descriptor(self) -> dict[str, Any]:
        return {
            "coding": "huffman",
            "count": self.count,
            "alphabet": self.alphabet,
            "group": self.group,
            "block_size": self.block_size,
            "width": self.width,
        }


def _block_width(block_size: int, max_len: int) -> int:
    return 2 if block_size * max_len < 1 << 16 else 4


def _histogram(symbols: np.ndarray, alphabet: int) -> np.ndarray:
    if symbols.dtype == np.uint64:  # bincount refuses uint64; our symbols are < 2**32
        symbols = symbols.astype(np.int64)
    return np.bincount(symbols, minlength=alphabet)


def _grouped(symbols: np.ndarray, alphabet: int, group: int) -> np.ndarray:
    if group == 1:
        return symbols
    s = symbols.astype(np.uint32)
    if s.size % 2:
        s = np.append(s, np.uint32(0))
    return s[0::2] * np.uint32(alphabet) + s[1::2]


def _ungrouped(coded: np.ndarray, alphabet: int, group: int, count: int) -> np.ndarray:
    """Symbols from decoded codes: split pairs, check the pad, use the smallest dtype."""
    dtype = np.uint8 if alphabet <= 256 else np.uint16 if alphabet <= 1 << 16 else np.uint32
    if group == 1:
        return coded.astype(dtype, copy=False)
    out = np.empty(2 * coded.size, dtype=dtype)
    np.floor_divide(coded, alphabet, out=out[0::2], casting="unsafe")
    np.remainder(coded, alphabet, out=out[1::2], casting="unsafe")
    if count % 2 and out[-1] != 0:
        raise ValueError("nonzero padding symbol")
    return out[:count]


def _stream_nbytes(counts: np.ndarray) -> int:
    """Exact serialized size of a HuffmanStream with this histogram, without coding it."""
    lengths = huffman.code_lengths(counts, WRITE_MAX_CODE_LEN)
    n = int(counts.sum())
    block_size = huffman.choose_block_size(n)
    n_blocks = -(-n // block_size)
    width = _block_width(block_size, int(lengths.max(initial=0)))
    return counts.size + n_blocks * width + (huffman.coded_bits(counts, lengths) + 7) // 8


def _stream_choice(symbols: np.ndarray, alphabet: int) -> tuple[int, int]:
    """(bytes, group) of the smaller way to code ``symbols``: one or two per code."""
    options = [(_stream_nbytes(_histogram(symbols, alphabet)), 1)]
    # Pairs save under one bit per symbol, so a pair table larger than that cannot pay off.
    if alphabet**2 <= MAX_PAIR_ALPHABET and alphabet**2 - alphabet < symbols.size // 8:
        pairs = _grouped(symbols, alphabet, 2)
        options.append((_stream_nbytes(_histogram(pairs, alphabet**2)), 2))
    return min(options)


@dataclass(frozen=True, eq=False)
class PositionsEncoding:
    """Where the nonzeros of a flattened tensor are.

    ``relidx``: Deep Compression's relative index, gaps with filler entries; ``runs``:
    alternating zero/nonzero run lengths; both as escape-coded symbols of ``bits``
    bits, Huffman-coded. ``bitmap``: one bit per element.
    """

    method: str
    count: int
    bits: int = 0
    stream: HuffmanStream | None = None
    bitmap: bytes = b""

    @property
    def nbytes(self) -> int:
        return self.stream.nbytes if self.stream is not None else len(self.bitmap)


@dataclass(frozen=True, eq=False)
class TensorEncoding:
    """A tensor ready to be written: coded streams plus the raw side arrays."""

    kind: str  # "clustered" | "int8" | "raw"
    shape: tuple[int, ...]
    dtype: str
    values: HuffmanStream | np.ndarray  # ndarray only for kind "raw"
    positions: PositionsEncoding | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # codebook / scale / zero_point
    zero_index: int | None = None
    axis: int | None = None

    @property
    def nbytes(self) -> int:
        """Payload bytes this tensor will occupy in the file (excluding its table entry)."""
        values = (
            self.values.nbytes if isinstance(self.values, HuffmanStream) else self.values.nbytes
        )
        positions = self.positions.nbytes if self.positions is not None else 0
        return values + positions + sum(a.nbytes for a in self.arrays.values())


# --------------------------------------------------------------------------- positions coding


def _escape(values: np.ndarray, bits: int) -> np.ndarray:
    """Values as symbols in [0, 2**bits): the top symbol E = 2**bits - 1 is a filler that
    adds E to the next symbol (Deep Compression's filler zero, but carrying no value)."""
    escape = (1 << bits) - 1
    fillers = values // escape
    out = np.full(values.size + int(fillers.sum()), escape, dtype=np.uint16)
    out[np.cumsum(fillers + 1) - 1] = values % escape
    return out


def _unescape(symbols: np.ndarray, bits: int) -> np.ndarray:
    escape = (1 << bits) - 1
    if symbols.size and symbols[-1] == escape:
        raise ValueError("stream ends with a filler")
    final = np.flatnonzero(symbols != escape)
    fillers = np.diff(final, prepend=-1) - 1
    return fillers * escape + symbols[final].astype(np.int64)


def _gaps(nonzero: np.ndarray) -> np.ndarray:
    """Zeros skipped before each nonzero position."""
    return np.diff(nonzero, prepend=-1) - 1


def _runs(mask: np.ndarray, nonzero: np.ndarray) -> np.ndarray:
    """Alternating zero/nonzero run lengths up to the last nonzero; runs after the first
    are at least 1 long, so they are stored minus one."""
    if nonzero.size == 0:
        return np.zeros(0, dtype=np.int64)
    body = mask[: int(nonzero[-1]) + 1]
    edges = np.flatnonzero(body[1:] != body[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [body.size]]))
    if body[0]:
        runs = np.concatenate([[0], runs])
    runs[1:] -= 1
    return runs


def _escape_bit_range(values: np.ndarray) -> range:
    # Beyond the width where no value needs a filler, wider symbols only grow the table.
    top = int(values.max(initial=0)) + 1
    return range(1, min(MAX_ESCAPE_BITS, top.bit_length()) + 1)


def _best_escape(values: np.ndarray) -> tuple[int, int, int]:
    """(bytes, bits, group) of the cheapest escape width and grouping for these values."""
    best = None
    for bits in _escape_bit_range(values):
        nbytes, group = _stream_choice(_escape(values, bits), 1 << bits)
        if best is None or nbytes < best[0]:
            best = (nbytes, bits, group)
    return best


def position_costs(mask: np.ndarray) -> dict[str, int]:
    """Exact encoded bytes of each positions method for a boolean nonzero mask."""
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    nonzero = np.flatnonzero(mask)
    return {
        "relidx": _best_escape(_gaps(nonzero))[0],
        "runs": _best_escape(_runs(mask, nonzero))[0],
        "bitmap": (mask.size + 7) // 8,
    }


def encode_positions(mask: np.ndarray, method: str | None = None) -> PositionsEncoding:
    """Encode the True positions of a flattened mask with ``method``, or the smallest one."""
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    nonzero = np.flatnonzero(mask)
    if method is None:
        costs = position_costs(mask)
        method = min(_POSITION_METHODS, key=lambda m: (costs[m], _POSITION_METHODS.index(m)))
    if method == "bitmap":
        bitmap = np.packbits(mask, bitorder="little").tobytes()
        return PositionsEncoding("bitmap", int(nonzero.size), bitmap=bitmap)
    if method not in ("relidx", "runs"):
        raise ValueError(f"unknown positions method {method!r}")
    values = _gaps(nonzero) if method == "relidx" else _runs(mask, nonzero)
    _, bits, group = _best_escape(values)
    stream = HuffmanStream.from_symbols(_escape(values, bits), 1 << bits, group)
    return PositionsEncoding(method, int(nonzero.size), bits, stream)


def decode_positions(positions: PositionsEncoding, size: int) -> np.ndarray:
    """Flat nonzero positions (int64, ascending) of a tensor with ``size`` elements."""
    if positions.stream is None:
        return _positions_from_bitmap(positions.bitmap, positions.count, size)
    symbols = positions.stream.decode()
    return _positions_from_symbols(positions.method, symbols, positions.bits, positions.count, size)


def _positions_from_symbols(
    method: str, symbols: np.ndarray, bits: int, count: int, size: int
) -> np.ndarray:
    """Flat nonzero positions (int64, ascending) from a decoded relidx/runs stream."""
    values = _unescape(symbols, bits)
    if method == "relidx":
        if values.size != count:
            raise ValueError(f"decodes to {values.size} positions, header says {count}")
        positions = np.cumsum(values + 1) - 1
    else:
        if values.size % 2:
            raise ValueError("odd number of runs")
        runs = values.copy()
        runs[1:] += 1
        ones = runs[1::2]
        if int(ones.sum()) != count:
            raise ValueError(f"decodes to {int(ones.sum())} positions, header says {count}")
        starts = np.cumsum(runs)[0::2]  # first position of each nonzero run
        before = np.cumsum(ones) - ones  # nonzeros preceding each run
        positions = np.arange(count, dtype=np.int64) + np.repeat(starts - before, ones)
    if positions.size and positions[-1] >= size:
        raise ValueError(f"position {int(positions[-1])} outside a tensor of {size} elements")
    return positions


def _positions_from_bitmap(bitmap: memoryview | bytes, count: int, size: int) -> np.ndarray:
    raw = np.frombuffer(bitmap, dtype=np.uint8)
    if size % 8 and int(raw[-1]) >> (size % 8):
        raise ValueError("nonzero padding bits")
    positions = np.flatnonzero(np.unpackbits(raw, count=size, bitorder="little"))
    if positions.size != count:
        raise ValueError(f"bitmap has {positions.size} set bits, header says {count}")
    return positions


# --------------------------------------------------------------------------- building encodings


def encode_clustered(
    indices: np.ndarray,
    codebook: np.ndarray,
    shape: tuple[int, ...] | None = None,
    zero_index: int | None = 0,
) -> TensorEncoding:
    """Encode cluster indices (any integer dtype, values in [0, len(codebook))).

    Entries equal to ``zero_index`` (whose centroid must be exactly 0) are pruned and
    stored as positions when that is smaller than coding them densely; pass None to
    always code densely. ``shape`` reshapes flat indices. The codebook is stored as float32.
    """
    idx = np.asarray(indices)
    if shape is not None:
        idx = idx.reshape(tuple(shape))
    if not np.issubdtype(idx.dtype, np.integer) or idx.dtype.name not in _INT_DTYPES:
        raise TypeError(f"indices must have an integer dtype, got {idx.dtype}")
    book = np.ascontiguousarray(codebook, dtype=np.float32).reshape(-1)
    k = book.size
    if not 1 <= k <= MAX_CODEBOOK:
        raise ValueError(f"codebook must have 1..{MAX_CODEBOOK} entries, got {k}")
    if np.iinfo(idx.dtype).max < k - 1:
        raise ValueError(f"dtype {idx.dtype} cannot hold cluster index {k - 1}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= k):
        raise ValueError(f"cluster indices must lie in [0, {k})")
    if zero_index is not None:
        if not 0 <= zero_index < k:
            raise ValueError(f"zero_index {zero_index} outside the codebook")
        if book[zero_index] != 0:
            raise ValueError(f"codebook[{zero_index}] is {book[zero_index]}, not 0")
    flat = idx.reshape(-1)
    positions, values = _choose_sparse(flat, k, None if zero_index is None else flat != zero_index)
    return TensorEncoding(
        "clustered",
        tuple(int(d) for d in idx.shape),
        idx.dtype.name,
        values,
        positions,
        {"codebook": book},
        zero_index=zero_index,
    )


def encode_int8(
    q: np.ndarray,
    scale: np.ndarray | float,
    zero_point: np.ndarray | int = 0,
    axis: int | None = None,
) -> TensorEncoding:
    """Encode int8 codes with per-tensor (axis None) or per-``axis`` scale/zero point.

    ``scale`` (float16/32/64) and ``zero_point`` (any integer dtype) are stored raw with
    their dtype and shape; entries equal to their zero point are treated as pruned.
    """
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise TypeError(f"q must be int8, got {q.dtype}")
    scale_arr = np.asarray(scale)
    if scale_arr.dtype.name not in _FLOAT_DTYPES:
        scale_arr = scale_arr.astype(np.float32)
    zp_arr = np.asarray(zero_point)
    if zp_arr.dtype.name not in _INT_DTYPES:
        raise TypeError(f"zero_point must have an integer dtype, got {zp_arr.dtype}")
    axis = _normalize_axis(axis, q.ndim)
    channels = 1 if axis is None else q.shape[axis]
    for name, arr in (("scale", scale_arr), ("zero_point", zp_arr)):
        if arr.size != channels or arr.ndim > MAX_NDIM:
            raise ValueError(f"{name} has {arr.size} entries; axis {axis} needs {channels}")
    flat = q.reshape(-1)
    zero = _broadcast_channel(zp_arr, q.shape, axis).reshape(-1)
    positions, values = _choose_sparse(flat.view(np.uint8) ^ np.uint8(0x80), 256, flat != zero)
    return TensorEncoding(
        "int8",
        tuple(int(d) for d in q.shape),
        "int8",
        values,
        positions,
        {"scale": np.ascontiguousarray(scale_arr), "zero_point": np.ascontiguousarray(zp_arr)},
        axis=axis,
    )


def encode_raw(arr: np.ndarray) -> TensorEncoding:
    """Store an array verbatim (little-endian), e.g. float16/float32 biases and norms."""
    a = np.asarray(arr)
    if a.dtype.name not in _DTYPES:
        raise TypeError(f"unsupported dtype {a.dtype}; use one of {sorted(_DTYPES)}")
    return TensorEncoding(
        "raw", tuple(int(d) for d in a.shape), a.dtype.name, np.ascontiguousarray(a)
    )


def encode_tensor(tensor: CpzTensor) -> TensorEncoding:
    """Encode a decoded tensor (as returned by :func:`read_cpz`) again."""
    if isinstance(tensor, ClusteredTensor):
        return encode_clustered(tensor.indices, tensor.codebook, zero_index=tensor.zero_index)
    if isinstance(tensor, Int8Tensor):
        return encode_int8(tensor.q, tensor.scale, tensor.zero_point, tensor.axis)
    if isinstance(tensor, RawTensor):
        return encode_raw(tensor.array)
    raise TypeError(f"cannot encode {type(tensor).__name__}")


def _choose_sparse(
    symbols: np.ndarray, alphabet: int, mask: np.ndarray | None
) -> tuple[PositionsEncoding | None, HuffmanStream]:
    """Dense values, or positions + nonzero values, whichever is smaller."""
    dense_cost, dense_group = _stream_choice(symbols, alphabet)
    if mask is not None and symbols.size:
        kept = symbols[mask]
        positions = encode_positions(mask)
        kept_cost, kept_group = _stream_choice(kept, alphabet)
        if positions.nbytes + kept_cost < dense_cost:
            return positions, HuffmanStream.from_symbols(kept, alphabet, kept_group)
    return None, HuffmanStream.from_symbols(symbols, alphabet, dense_group)


def _normalize_axis(axis: int | None, ndim: int) -> int | None:
    if axis is None:
        return None
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for {ndim} dimensions")
    return axis % ndim


def _broadcast_channel(values: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    view = [1] * len(shape)
    if axis is not None:
        view[axis] = -1
    return np.broadcast_to(values.reshape(view), shape)


# --------------------------------------------------------------------------- writing


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
    le = np.ascontiguousarray(arr, dtype=_DTYPES[arr.dtype.name])
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


def pack_cpz(tensors: Mapping[str, TensorEncoding], metadata: Mapping[str, Any]) -> bytes:
    """Serialize encoded tensors and a JSON-serializable metadata dict to .cpz bytes."""
    if not isinstance(metadata, Mapping):
        raise TypeError("metadata must be a mapping")
    payload = _Payload()
    entries = []
    for name, enc in tensors.items():
        problem = _name_problem(name)
        if problem:
            raise ValueError(f"tensor name {name!r}: {problem}")
        if not isinstance(enc, TensorEncoding):
            raise TypeError(f"tensor {name!r}: expected a TensorEncoding, got {type(enc).__name__}")
        entries.append(_tensor_entry(payload, name, enc))
    meta = _json_bytes(dict(metadata), "metadata")
    table = _json_bytes({"tensors": entries}, "section table")
    total = _HEADER.size + 2 * _SECTION.size + len(meta) + len(table) + payload.size + _DIGEST_SIZE
    parts = [
        _HEADER.pack(MAGIC, VERSION, 0, total),
        _SECTION.pack(len(meta), zlib.crc32(meta)),
        meta,
        _SECTION.pack(len(table), zlib.crc32(table)),
        table,
        *payload.parts,
    ]
    body = b"".join(parts)
    return body + hashlib.blake2b(body, digest_size=_DIGEST_SIZE).digest()


def write_cpz(
    path: str | os.PathLike, tensors: Mapping[str, TensorEncoding], metadata: Mapping[str, Any]
) -> int:
    """Write a .cpz file atomically (temp file in the same directory, then rename); return its size."""
    data = pack_cpz(tensors, metadata)
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


# --------------------------------------------------------------------------- reading: structure


@contextmanager
def _section(where: str) -> Iterator[None]:
    """Re-raise anything that goes wrong while reading ``where`` as a CpzFormatError naming it."""
    try:
        yield
    except CpzFormatError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as exc:
        raise CpzFormatError(f"{where}: {exc}") from exc


def _fail(where: str, message: str) -> CpzFormatError:
    return CpzFormatError(f"{where}: {message}")


def _name_problem(name: object) -> str | None:
    """Why ``name`` is not an acceptable tensor name (None if it is)."""
    if not isinstance(name, str):
        return "not a string"
    if not 1 <= len(name) <= MAX_NAME_LEN:
        return f"length must be 1..{MAX_NAME_LEN}"
    # Names may become file names or keys downstream; refuse anything path-like or invisible.
    if not name.isprintable() or "/" in name or "\\" in name or name.startswith("."):
        return "must be printable, contain no '/' or '\\' and not start with '.'"
    return None


@dataclass(frozen=True)
class _Blob:
    offset: int
    length: int
    crc32: int


@dataclass(frozen=True)
class _ArraySpec:
    dtype: np.dtype
    shape: tuple[int, ...]
    blob: _Blob


@dataclass(frozen=True)
class _StreamSpec:
    count: int
    alphabet: int
    group: int
    block_size: int
    width: int
    blob: _Blob

    @property
    def coded(self) -> int:
        """Huffman codes in the bitstream."""
        return -(-self.count // self.group)

    @property
    def n_blocks(self) -> int:
        return -(-self.coded // self.block_size)

    @property
    def table_bytes(self) -> int:
        return self.alphabet**self.group + self.n_blocks * self.width


@dataclass(frozen=True)
class _PositionsSpec:
    method: str
    count: int
    bits: int
    stream: _StreamSpec | None
    blob: _Blob | None


@dataclass(frozen=True)
class _Entry:
    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: np.dtype
    size: int
    zero_index: int | None
    axis: int | None
    arrays: dict[str, _ArraySpec]
    positions: _PositionsSpec | None
    values: _StreamSpec | _Blob

    def blobs(self) -> list[_Blob]:
        out = [a.blob for a in self.arrays.values()]
        if self.positions is not None:
            out.append(
                self.positions.blob if self.positions.stream is None else self.positions.stream.blob
            )
        out.append(self.values if isinstance(self.values, _Blob) else self.values.blob)
        return out


@dataclass(frozen=True)
class _Parsed:
    metadata: dict[str, Any]
    entries: list[_Entry]
    payload: memoryview


def _keys(obj: object, required: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _fail(where, f"expected an object, got {type(obj).__name__}")
    if set(obj) != required:
        missing, extra = sorted(required - set(obj)), sorted(set(obj) - required)
        raise _fail(where, f"missing keys {missing}" if missing else f"unexpected keys {extra}")
    return obj


def _int(value: object, lo: int, hi: int, where: str) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(where, f"expected an integer in [{lo}, {hi}], got {value!r:.40}")
    return value


def _dtype(value: object, allowed: set[str], where: str) -> np.dtype:
    if not isinstance(value, str) or value not in allowed:
        raise _fail(where, f"unsupported dtype {value!r:.40}")
    return _DTYPES[value]


def _shape(value: object, where: str) -> tuple[tuple[int, ...], int]:
    if not isinstance(value, list) or len(value) > MAX_NDIM:
        raise _fail(where, f"shape must be a list of at most {MAX_NDIM} sizes")
    dims = tuple(_int(d, 0, 1 << 62, f"{where}: shape") for d in value)
    size = 1
    for d in dims:
        size *= d  # Python ints: no overflow, and each factor is capped
    return dims, size


def _blob(value: object, payload_size: int, where: str) -> _Blob:
    obj = _keys(value, {"offset", "length", "crc32"}, where)
    offset = _int(obj["offset"], 0, payload_size, where)
    length = _int(obj["length"], 0, payload_size - offset, where)
    return _Blob(offset, length, _int(obj["crc32"], 0, 0xFFFFFFFF, where))


def _array_spec(value: object, allowed: set[str], payload_size: int, where: str) -> _ArraySpec:
    obj = _keys(value, {"dtype", "shape", "blob"}, where)
    dtype = _dtype(obj["dtype"], allowed, where)
    shape, size = _shape(obj["shape"], where)
    blob = _blob(obj["blob"], payload_size, where)
    if blob.length != size * dtype.itemsize:
        raise _fail(where, f"{blob.length} bytes cannot hold {size} x {dtype.name}")
    return _ArraySpec(dtype, shape, blob)


def _stream_spec(value: object, alphabet: int | None, payload_size: int, where: str) -> _StreamSpec:
    keys = {"coding", "count", "alphabet", "group", "block_size", "width", "blob"}
    obj = _keys(value, keys, where)
    if obj["coding"] != "huffman":
        raise _fail(where, f"unknown coding {obj['coding']!r:.40}")
    blob = _blob(obj["blob"], payload_size, where)
    group = _int(obj["group"], 1, 2, f"{where}: group")
    spec = _StreamSpec(
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
        raise _fail(where, "block size must be a power of two and width 2 or 4")
    if alphabet is not None and spec.alphabet != alphabet:
        raise _fail(where, f"alphabet {spec.alphabet}, expected {alphabet}")
    if spec.group == 2 and spec.alphabet**2 > MAX_PAIR_ALPHABET:
        raise _fail(where, f"pairs of a {spec.alphabet}-symbol alphabet exceed {MAX_PAIR_ALPHABET}")
    if blob.length < spec.table_bytes:
        raise _fail(where, f"{blob.length} bytes cannot hold the code and block tables")
    return spec


def _positions_spec(
    value: object, size: int, payload_size: int, where: str
) -> _PositionsSpec | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("method") not in _POSITION_METHODS:
        raise _fail(where, "expected null or an object with method relidx, runs or bitmap")
    if value["method"] == "bitmap":
        obj = _keys(value, {"method", "count", "blob"}, where)
        blob = _blob(obj["blob"], payload_size, where)
        if blob.length != (size + 7) // 8:
            raise _fail(where, f"bitmap of {blob.length} bytes for {size} elements")
        return _PositionsSpec(
            "bitmap", _int(obj["count"], 0, size, f"{where}: count"), 0, None, blob
        )
    obj = _keys(value, {"method", "count", "bits", "stream"}, where)
    bits = _int(obj["bits"], 1, MAX_ESCAPE_BITS, f"{where}: bits")
    stream = _stream_spec(obj["stream"], 1 << bits, payload_size, where)
    return _PositionsSpec(
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


def _entry(value: object, payload_size: int, where: str) -> _Entry:
    if not isinstance(value, dict):
        raise _fail(where, "expected an object")
    name = value.get("name")
    problem = _name_problem(name)
    if problem:
        raise _fail(where, f"bad tensor name {name!r:.80}: {problem}")
    where = f"tensor {name!r}"
    kind = value.get("kind")
    if kind not in _ENTRY_KEYS:
        raise _fail(where, f"unknown kind {kind!r:.40}")
    obj = _keys(value, _ENTRY_KEYS[kind], where)
    shape, size = _shape(obj["shape"], where)
    arrays: dict[str, _ArraySpec] = {}
    zero_index = axis = None
    alphabet = 256
    if kind == "clustered":
        dtype = _dtype(obj["dtype"], _INT_DTYPES, where)
        arrays["codebook"] = _array_spec(
            obj["codebook"], {"float32"}, payload_size, f"{where}: codebook"
        )
        alphabet = arrays["codebook"].blob.length // 4
        if len(arrays["codebook"].shape) != 1 or not 1 <= alphabet <= MAX_CODEBOOK:
            raise _fail(f"{where}: codebook", f"must be 1-D with 1..{MAX_CODEBOOK} entries")
        if np.iinfo(dtype).max < alphabet - 1:
            raise _fail(where, f"dtype {dtype.name} cannot hold {alphabet} clusters")
        if obj["zero_index"] is not None:
            zero_index = _int(obj["zero_index"], 0, alphabet - 1, f"{where}: zero_index")
    elif kind == "int8":
        dtype = _dtype(obj["dtype"], {"int8"}, where)
        if obj["axis"] is not None:
            axis = _int(obj["axis"], 0, len(shape) - 1, f"{where}: axis")
        channels = 1 if axis is None else shape[axis]
        arrays["scale"] = _array_spec(obj["scale"], _FLOAT_DTYPES, payload_size, f"{where}: scale")
        arrays["zero_point"] = _array_spec(
            obj["zero_point"], _INT_DTYPES, payload_size, f"{where}: zero_point"
        )
        for key, spec in arrays.items():
            if spec.blob.length != channels * spec.dtype.itemsize:
                raise _fail(f"{where}: {key}", f"needs {channels} entries for axis {axis}")
    else:
        dtype = _dtype(obj["dtype"], set(_DTYPES), where)
    if kind == "raw":
        values_obj = _keys(obj["values"], {"coding", "blob"}, f"{where}: values")
        if values_obj["coding"] != "raw":
            raise _fail(f"{where}: values", f"unknown coding {values_obj['coding']!r:.40}")
        values: _StreamSpec | _Blob = _blob(values_obj["blob"], payload_size, f"{where}: values")
        if values.length != size * dtype.itemsize:
            raise _fail(
                f"{where}: values", f"{values.length} bytes cannot hold {size} x {dtype.name}"
            )
        positions = None
    else:
        positions = _positions_spec(obj["positions"], size, payload_size, f"{where}: positions")
        values = _stream_spec(obj["values"], alphabet, payload_size, f"{where}: values stream")
        if positions is not None and kind == "clustered" and zero_index is None:
            raise _fail(f"{where}: positions", "present but zero_index is null")
        expected = size if positions is None else positions.count
        if values.count != expected:
            raise _fail(
                f"{where}: values stream", f"holds {values.count} symbols, expected {expected}"
            )
    return _Entry(name, kind, shape, dtype, size, zero_index, axis, arrays, positions, values)


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_section(buf: memoryview, offset: int, where: str) -> tuple[Any, int]:
    """Parse one length + crc32 + JSON block at ``offset``; return the value and the next offset."""
    if offset + _SECTION.size > len(buf):
        raise _fail(where, "truncated")
    length, crc = _SECTION.unpack_from(buf, offset)
    start = offset + _SECTION.size
    if length > len(buf) - start:
        raise _fail(where, f"length {length} runs past the end of the file")
    raw = buf[start : start + length]
    if zlib.crc32(raw) != crc:
        raise _fail(where, "checksum mismatch")
    with _section(where):
        value = json.loads(
            bytes(raw).decode("utf-8"),
            object_pairs_hook=_strict_object,
            parse_constant=_reject_constant,
        )
    return value, start + length


def _parse(data: bytes | bytearray | memoryview, max_elements: int) -> _Parsed:
    """Check the header, checksums and section table; decode nothing yet."""
    buf = memoryview(data).cast("B")
    if len(buf) < _MIN_FILE:
        raise _fail("header", f"file of {len(buf)} bytes is too short to be a .cpz file")
    magic, version, flags, declared = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise _fail("header", f"bad magic {bytes(magic)!r}, not a .cpz file")
    if version != VERSION:
        raise _fail(
            "header", f"format version {version} is not supported (this reader handles {VERSION})"
        )
    if flags != 0:
        raise _fail("header", f"unknown flags 0x{flags:04x}")
    if declared != len(buf):
        raise _fail(
            "header", f"file is {len(buf)} bytes but its header says {declared} (truncated?)"
        )
    body = buf[:-_DIGEST_SIZE]
    if hashlib.blake2b(body, digest_size=_DIGEST_SIZE).digest() != bytes(buf[-_DIGEST_SIZE:]):
        raise _fail("file", "checksum mismatch")
    metadata, offset = _json_section(body, _HEADER.size, "metadata")
    if not isinstance(metadata, dict):
        raise _fail("metadata", "must be a JSON object")
    table, offset = _json_section(body, offset, "section table")
    payload = body[offset:]
    table = _keys(table, {"tensors"}, "section table")
    if not isinstance(table["tensors"], list):
        raise _fail("section table", "tensors must be a list")
    entries = [
        _entry(e, len(payload), f"section table: tensor #{i}")
        for i, e in enumerate(table["tensors"])
    ]
    _check_entries(entries, len(payload), max_elements)
    return _Parsed(metadata, entries, payload)


def _check_entries(entries: list[_Entry], payload_size: int, max_elements: int) -> None:
    names: set[str] = set()
    total = 0
    for e in entries:
        if e.name in names:
            raise _fail(f"tensor {e.name!r}", "duplicate name")
        names.add(e.name)
        total += e.size
        if total > max_elements:
            raise _fail(
                f"tensor {e.name!r}", f"tensors hold more than max_elements={max_elements} elements"
            )
    # Blobs must tile the payload exactly: no overlaps (each byte decodes once, which
    # bounds total work by the file size) and no unaccounted bytes.
    blobs = sorted((b.offset, b.length, e.name) for e in entries for b in e.blobs())
    end = 0
    for offset, length, name in blobs:
        if offset != end:
            problem = "overlaps another blob" if offset < end else "leaves a gap in the payload"
            raise _fail(f"tensor {name!r}", f"blob at payload offset {offset} {problem}")
        end = offset + length
    if end != payload_size:
        raise _fail("section table", f"blobs cover {end} of {payload_size} payload bytes")


# --------------------------------------------------------------------------- reading: decoding


def _read_blob(payload: memoryview, blob: _Blob, where: str) -> memoryview:
    raw = payload[blob.offset : blob.offset + blob.length]
    if zlib.crc32(raw) != blob.crc32:
        raise _fail(where, "checksum mismatch")
    return raw


def _read_array(payload: memoryview, spec: _ArraySpec, where: str) -> np.ndarray:
    raw = _read_blob(payload, spec.blob, where)
    arr = np.frombuffer(raw, dtype=spec.dtype).reshape(spec.shape)
    return arr.astype(spec.dtype.newbyteorder("="))  # native byte order, and a writable copy


@dataclass(frozen=True)
class _StreamJob:
    """A Huffman stream whose blob and code tables passed their checks, ready to decode."""

    spec: _StreamSpec
    where: str
    args: tuple  # huffman.decode's arguments


def _stream_job(payload: memoryview, spec: _StreamSpec, where: str) -> _StreamJob:
    raw = _read_blob(payload, spec.blob, where)
    with _section(where):
        n_codes = spec.alphabet**spec.group
        lengths = huffman.validate_lengths(np.frombuffer(raw[:n_codes], dtype=np.uint8))
        spans = np.frombuffer(raw[n_codes : spec.table_bytes], dtype=f"<u{spec.width}")
        offsets = np.concatenate([[0], np.cumsum(spans, dtype=np.int64)])
    args = (raw[spec.table_bytes :], lengths, spec.coded, offsets, spec.block_size)
    return _StreamJob(spec, where, args)


def _ungroup(job: _StreamJob, coded: np.ndarray) -> np.ndarray:
    with _section(job.where):
        return _ungrouped(coded, job.spec.alphabet, job.spec.group, job.spec.count)


def _read_stream(payload: memoryview, spec: _StreamSpec, where: str) -> np.ndarray:
    job = _stream_job(payload, spec, where)
    with _section(where):
        coded = huffman.decode(*job.args)
    return _ungroup(job, coded)


def _read_positions(payload: memoryview, spec: _PositionsSpec, size: int, where: str) -> np.ndarray:
    if spec.stream is None:
        raw = _read_blob(payload, spec.blob, where)
        with _section(where):
            return _positions_from_bitmap(raw, spec.count, size)
    symbols = _read_stream(payload, spec.stream, where)
    with _section(where):
        return _positions_from_symbols(spec.method, symbols, spec.bits, spec.count, size)


@dataclass(frozen=True)
class _Pending:
    """A tensor read up to its Huffman streams, which are decoded with those of the whole file."""

    entry: _Entry
    arrays: dict[str, np.ndarray]
    jobs: list[_StreamJob]  # the values stream, then the positions stream if any
    bitmap: memoryview | None = None
    tensor: CpzTensor | None = None  # raw tensors are complete at once


def _read_entry(entry: _Entry, payload: memoryview) -> _Pending:
    """Check an entry's blobs and code tables; the Huffman decoding is left to the caller."""
    where = f"tensor {entry.name!r}"
    if entry.kind == "raw":
        raw = _read_blob(payload, entry.values, f"{where}: values")
        array = np.frombuffer(raw, dtype=entry.dtype).reshape(entry.shape)
        if entry.dtype.kind == "b" and raw and np.frombuffer(raw, np.uint8).max() > 1:
            raise _fail(f"{where}: values", "bool bytes must be 0 or 1")
        return _Pending(
            entry, {}, [], tensor=RawTensor(array.astype(entry.dtype.newbyteorder("=")))
        )
    arrays = {k: _read_array(payload, s, f"{where}: {k}") for k, s in entry.arrays.items()}
    jobs = [_stream_job(payload, entry.values, f"{where}: values stream")]
    pos, bitmap = entry.positions, None
    if pos is not None and pos.stream is None:
        bitmap = _read_blob(payload, pos.blob, f"{where}: positions stream")
    elif pos is not None:
        jobs.append(_stream_job(payload, pos.stream, f"{where}: positions stream"))
    return _Pending(entry, arrays, jobs, bitmap)


def _positions(pending: _Pending, coded: list[np.ndarray]) -> np.ndarray:
    spec, size = pending.entry.positions, pending.entry.size
    where = f"tensor {pending.entry.name!r}: positions stream"
    if spec.stream is None:
        with _section(where):
            return _positions_from_bitmap(pending.bitmap, spec.count, size)
    symbols = _ungroup(pending.jobs[1], coded[1])
    with _section(where):
        return _positions_from_symbols(spec.method, symbols, spec.bits, spec.count, size)


def _scatter(
    pending: _Pending, coded: list[np.ndarray], symbols: np.ndarray, fill: Any
) -> np.ndarray:
    """The tensor: ``symbols`` as is when dense, else ``fill`` with symbols at the nonzero positions."""
    entry = pending.entry
    if entry.positions is None:
        return symbols.reshape(entry.shape)
    positions = _positions(pending, coded)
    out = np.empty(entry.shape, dtype=symbols.dtype)
    out[...] = fill
    out.reshape(-1)[positions] = symbols
    return out


def _assemble(pending: _Pending, coded: list[np.ndarray]) -> CpzTensor:
    """The tensor of an entry from its decoded streams (``coded`` in the order of its jobs)."""
    if pending.tensor is not None:
        return pending.tensor
    entry, arrays = pending.entry, pending.arrays
    where = f"tensor {entry.name!r}"
    symbols = _ungroup(pending.jobs[0], coded[0])
    native = entry.dtype.newbyteorder("=")
    if entry.kind == "clustered":
        codebook = arrays["codebook"]
        if entry.zero_index is not None and codebook[entry.zero_index] != 0:
            raise _fail(f"{where}: codebook", f"entry {entry.zero_index} (zero_index) is not 0")
        indices = _scatter(pending, coded, symbols.astype(native), entry.zero_index)
        return ClusteredTensor(indices, codebook, entry.zero_index)
    zero_point = arrays["zero_point"]
    if entry.positions is not None and (
        zero_point.min(initial=0) < -128 or zero_point.max(initial=0) > 127
    ):
        raise _fail(f"{where}: zero_point", "outside the int8 range, so no entry can be pruned")
    q_symbols = (symbols ^ np.uint8(0x80)).view(np.int8)
    fill = _broadcast_channel(zero_point.astype(np.int8), entry.shape, entry.axis)
    q = _scatter(pending, coded, q_symbols, fill)
    return Int8Tensor(q, arrays["scale"], zero_point, entry.axis)


def _decode_streams(
    pending: list[_Pending], failure: CpzFormatError | None
) -> tuple[list[list[np.ndarray]], CpzFormatError | None]:
    """Decode the streams of all pending entries in one lock-step pass.

    ``failure`` is the error of the entry that follows the pending ones, if any. Returns
    the coded symbols of the entries up to the first one that fails, and the error to
    raise: that of a stream that fails to decode, or else ``failure``.
    """
    jobs = [(i, job) for i, p in enumerate(pending) for job in p.jobs]
    try:
        coded = huffman.decode_many([job.args for _, job in jobs])
    except huffman.StreamError as exc:
        # decode_many names the first failing stream: the ones before it decode fine.
        bad, job = jobs[exc.index]
        failure = _fail(job.where, str(exc.error))
        failure.__cause__ = exc
        jobs = [(i, j) for i, j in jobs if i < bad]
        pending = pending[:bad]
        coded = huffman.decode_many([job.args for _, job in jobs])
    per_entry: list[list[np.ndarray]] = [[] for _ in pending]
    for (i, _), symbols in zip(jobs, coded, strict=True):
        per_entry[i].append(symbols)
    return per_entry, failure


def unpack_cpz(
    data: bytes | bytearray | memoryview, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> tuple[dict[str, CpzTensor], dict[str, Any]]:
    """Decode .cpz bytes into ``({name: tensor}, metadata)``; raises CpzFormatError only."""
    parsed = _guarded(lambda: _parse(data, max_elements))
    # Every tensor is checked up to its Huffman streams, then all streams are decoded in
    # one pass (one numpy call per row decodes a symbol of every block of the file). The
    # error reported is still the one of the first tensor in the file that has one.
    pending: list[_Pending] = []
    failure = None
    for entry in parsed.entries:
        try:
            pending.append(
                _guarded(lambda e=entry: _read_entry(e, parsed.payload), f"tensor {entry.name!r}")
            )
        except CpzFormatError as exc:
            failure = exc
            break
    coded, failure = _guarded(lambda: _decode_streams(pending, failure))
    tensors = {}
    for p, c in zip(pending, coded, strict=False):  # only the entries before a failure
        tensors[p.entry.name] = _guarded(
            lambda p=p, c=c: _assemble(p, c), f"tensor {p.entry.name!r}"
        )
    if failure is not None:
        raise failure
    return tensors, parsed.metadata


def read_cpz(
    path: str | os.PathLike, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> tuple[dict[str, CpzTensor], dict[str, Any]]:
    """Read a .cpz file: ``({name: ClusteredTensor | Int8Tensor | RawTensor}, metadata)``."""
    return unpack_cpz(Path(path).read_bytes(), max_elements=max_elements)


def _guarded(fn: Callable[[], Any], where: str = "file") -> Any:
    # Last line of defence: explicit checks should have caught everything, but a reader
    # of hostile input must never leak another exception type.
    with _section(where):
        return fn()


# --------------------------------------------------------------------------- inspection


def _histogram_bits(symbols: np.ndarray) -> float:
    return huffman.entropy_bits(np.bincount(symbols)) if symbols.size else 0.0


def _inspect_entry(entry: _Entry, payload: memoryview) -> dict[str, Any]:
    where = f"tensor {entry.name!r}"
    side = sum(s.blob.length for s in entry.arrays.values())
    stats: dict[str, Any] = {
        "name": entry.name,
        "kind": entry.kind,
        "shape": list(entry.shape),
        "dtype": entry.dtype.name,
        "elements": entry.size,
        "positions_method": None,
        "positions_bits": None,
        "positions_bytes": 0,
        "values_bytes": 0,
        "table_bytes": side,
        "positions_entropy_bits": None,
        "values_entropy_bits": None,
        "positions_symbols": None,
        "values_symbols": None,
    }
    nonzero = entry.size
    if isinstance(entry.values, _Blob):
        stats["values_bytes"] = entry.values.length
    else:
        symbols = _read_stream(payload, entry.values, f"{where}: values stream")
        table = entry.values.table_bytes
        stats["values_bytes"] = entry.values.blob.length - table
        stats["table_bytes"] += table
        stats["values_entropy_bits"] = _histogram_bits(symbols)
        stats["values_symbols"] = entry.values.count
    pos = entry.positions
    if pos is not None:
        nonzero = pos.count
        stats["positions_method"] = pos.method
        if pos.stream is None:
            stats["positions_bytes"] = pos.blob.length
            _read_positions(payload, pos, entry.size, f"{where}: positions stream")
            stats["positions_entropy_bits"] = huffman.entropy_bits(
                np.array([pos.count, entry.size - pos.count])
            )
        else:
            symbols = _read_stream(payload, pos.stream, f"{where}: positions stream")
            table = pos.stream.table_bytes
            stats["positions_bits"] = pos.bits
            stats["positions_bytes"] = pos.stream.blob.length - table
            stats["table_bytes"] += table
            stats["positions_entropy_bits"] = _histogram_bits(symbols)
            stats["positions_symbols"] = pos.stream.count
    total = stats["positions_bytes"] + stats["values_bytes"] + stats["table_bytes"]
    stats.update(
        nonzero=nonzero,
        sparsity=1.0 - nonzero / entry.size if entry.size else 0.0,
        total_bytes=total,
        bits_per_weight=8.0 * total / entry.size if entry.size else 0.0,
    )
    return stats


def inspect_cpz(
    source: str | os.PathLike | bytes, *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> list[dict[str, Any]]:
    """Per-tensor statistics: shape, sparsity, bits per weight, bytes of positions, values
    and tables, and the Shannon bound (bits) of each coded stream. Verifies all checksums."""
    data = (
        source if isinstance(source, bytes | bytearray | memoryview) else Path(source).read_bytes()
    )
    parsed = _guarded(lambda: _parse(data, max_elements))
    return [
        _guarded(lambda e=e: _inspect_entry(e, parsed.payload), f"tensor {e.name!r}")
        for e in parsed.entries
    ]


def byte_parts(row: dict[str, Any]) -> dict[str, int]:
    """Bytes of one :func:`inspect_cpz` row by part: sparse positions, coded values, tables
    (code lengths, block offsets, codebooks, scales) and raw storage."""
    if row["kind"] == "raw":
        return {"positions": 0, "values": 0, "tables": 0,
                "raw": row["values_bytes"] + row["table_bytes"]}
    return {"positions": row["positions_bytes"], "values": row["values_bytes"],
            "tables": row["table_bytes"], "raw": 0}


def coding_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """File-level figures from :func:`inspect_cpz` rows: bits per nonzero weight of the coded
    positions and values next to their Shannon bounds, and bytes per part."""
    coded = [r for r in rows if r["kind"] != "raw"]
    nonzero = max(sum(int(r["nonzero"]) for r in coded), 1)
    out: dict[str, float] = {"coded_tensors": len(coded), "coded_nonzero": nonzero}
    parts = [byte_parts(r) for r in rows]
    for part, key in (("positions", "positions_bytes"), ("values", "values_bytes"),
                      ("tables", "table_bytes"), ("raw", "raw_bytes")):
        out[key] = sum(p[part] for p in parts)
    for stream in ("positions", "values"):
        out[f"{stream}_bits_per_nonzero"] = 8 * out[f"{stream}_bytes"] / nonzero
        bound = sum(r[f"{stream}_entropy_bits"] or 0 for r in coded)
        out[f"{stream}_entropy_bits_per_nonzero"] = bound / nonzero
    return out
