"""Decoding a ``.cpz`` file: :func:`unpack_cpz` and :func:`read_cpz`.

After :func:`~.parse.parse`, every tensor is checked up to its Huffman streams (blob
checksums, side arrays, code tables), then the streams of the whole file are decoded in one
lock-step pass (:func:`compresspipe.formats.huffman.decode_many`) and each tensor is
assembled from them, scattering its values to their positions. The error raised is that of
the first faulty tensor in the file, always a :class:`CpzFormatError` (:func:`guarded`).
:func:`read_stream` and :func:`read_positions` decode one stream alone, for
:mod:`.inspect`.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import huffman
from .container import DEFAULT_MAX_ELEMENTS, CpzFormatError
from .encode import ClusteredTensor, CpzTensor, Int8Tensor, RawTensor, broadcast_channel
from .parse import parse
from .positions import positions_from_bitmap, positions_from_symbols
from .specs import ArraySpec, Blob, Entry, PositionsSpec, StreamSpec, fail, section
from .streams import ungrouped


def _read_blob(payload: memoryview, blob: Blob, where: str) -> memoryview:
    raw = payload[blob.offset : blob.offset + blob.length]
    # version 2 stores no crc per blob: the file digest, checked first, covers them
    if blob.crc32 is not None and zlib.crc32(raw) != blob.crc32:
        raise fail(where, "checksum mismatch")
    return raw


def _read_array(payload: memoryview, spec: ArraySpec, where: str) -> np.ndarray:
    raw = _read_blob(payload, spec.blob, where)
    arr = np.frombuffer(raw, dtype=spec.dtype).reshape(spec.shape)
    return arr.astype(spec.dtype.newbyteorder("="))  # native byte order, and a writable copy


@dataclass(frozen=True)
class _StreamJob:
    """A Huffman stream whose blob and code tables passed their checks, ready to decode."""

    spec: StreamSpec
    where: str
    args: tuple  # huffman.decode's arguments


def _stream_job(payload: memoryview, spec: StreamSpec, where: str) -> _StreamJob:
    raw = _read_blob(payload, spec.blob, where)
    with section(where):
        n_codes = spec.alphabet**spec.group
        lengths = huffman.validate_lengths(np.frombuffer(raw[:n_codes], dtype=np.uint8))
        spans = np.frombuffer(raw[n_codes : spec.table_bytes], dtype=f"<u{spec.width}")
        offsets = np.concatenate([[0], np.cumsum(spans, dtype=np.int64)])
    args = (raw[spec.table_bytes :], lengths, spec.coded, offsets, spec.block_size)
    return _StreamJob(spec, where, args)


def _ungroup(job: _StreamJob, coded: np.ndarray) -> np.ndarray:
    with section(job.where):
        return ungrouped(coded, job.spec.alphabet, job.spec.group, job.spec.count)


def read_stream(payload: memoryview, spec: StreamSpec, where: str) -> np.ndarray:
    job = _stream_job(payload, spec, where)
    with section(where):
        coded = huffman.decode(*job.args)
    return _ungroup(job, coded)


def read_positions(payload: memoryview, spec: PositionsSpec, size: int, where: str) -> np.ndarray:
    if spec.stream is None:
        raw = _read_blob(payload, spec.blob, where)
        with section(where):
            return positions_from_bitmap(raw, spec.count, size)
    symbols = read_stream(payload, spec.stream, where)
    with section(where):
        return positions_from_symbols(spec.method, symbols, spec.bits, spec.count, size)


@dataclass(frozen=True)
class _Pending:
    """A tensor read up to its Huffman streams, which are decoded with those of the whole file."""

    entry: Entry
    arrays: dict[str, np.ndarray]
    jobs: list[_StreamJob]  # the values stream, then the positions stream if any
    bitmap: memoryview | None = None
    tensor: CpzTensor | None = None  # raw tensors are complete at once


def _read_entry(entry: Entry, payload: memoryview) -> _Pending:
    """Check an entry's blobs and code tables; the Huffman decoding is left to the caller."""
    where = f"tensor {entry.name!r}"
    if entry.kind == "raw":
        raw = _read_blob(payload, entry.values, f"{where}: values")
        array = np.frombuffer(raw, dtype=entry.dtype).reshape(entry.shape)
        if entry.dtype.kind == "b" and raw and np.frombuffer(raw, np.uint8).max() > 1:
            raise fail(f"{where}: values", "bool bytes must be 0 or 1")
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
        with section(where):
            return positions_from_bitmap(pending.bitmap, spec.count, size)
    symbols = _ungroup(pending.jobs[1], coded[1])
    with section(where):
        return positions_from_symbols(spec.method, symbols, spec.bits, spec.count, size)


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
            raise fail(f"{where}: codebook", f"entry {entry.zero_index} (zero_index) is not 0")
        indices = _scatter(pending, coded, symbols.astype(native), entry.zero_index)
        return ClusteredTensor(indices, codebook, entry.zero_index)
    zero_point = arrays["zero_point"]
    if entry.positions is not None and (
        zero_point.min(initial=0) < -128 or zero_point.max(initial=0) > 127
    ):
        raise fail(f"{where}: zero_point", "outside the int8 range, so no entry can be pruned")
    q_symbols = (symbols ^ np.uint8(0x80)).view(np.int8)
    fill = broadcast_channel(zero_point.astype(np.int8), entry.shape, entry.axis)
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
        failure = fail(job.where, str(exc.error))
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
    parsed = guarded(lambda: parse(data, max_elements))
    # Every tensor is checked up to its Huffman streams, then all streams are decoded in
    # one pass (one numpy call per row decodes a symbol of every block of the file). The
    # error reported is still the one of the first tensor in the file that has one.
    pending: list[_Pending] = []
    failure = None
    for entry in parsed.entries:
        try:
            pending.append(
                guarded(lambda e=entry: _read_entry(e, parsed.payload), f"tensor {entry.name!r}")
            )
        except CpzFormatError as exc:
            failure = exc
            break
    coded, failure = guarded(lambda: _decode_streams(pending, failure))
    tensors = {}
    for p, c in zip(pending, coded, strict=False):  # only the entries before a failure
        tensors[p.entry.name] = guarded(
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


def guarded(fn: Callable[[], Any], where: str = "file") -> Any:
    # Last line of defence: explicit checks should have caught everything, but a reader
    # of hostile input must never leak another exception type.
    with section(where):
        return fn()
