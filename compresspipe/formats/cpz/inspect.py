"""Inspecting a ``.cpz`` file: what each tensor costs and how close it is to its bound.

:func:`inspect_cpz` verifies every checksum and gives one row per tensor: shape, sparsity,
bits per weight, the bytes of its positions, values and tables, and the order-0 Shannon
bound of each coded stream. :func:`byte_parts` splits a row's bytes by part,
:func:`coding_summary` sums the rows of a file and :func:`container_parts` splits the whole
file: the container's own bytes (header, metadata, section table, digest), the Huffman code
tables, codebooks and other side arrays, coded positions and values, and raw tensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import huffman
from .container import DEFAULT_MAX_ELEMENTS
from .decode import guarded, read_positions, read_stream
from .parse import parse
from .specs import Blob, Entry


def _histogram_bits(symbols: np.ndarray) -> float:
    return huffman.entropy_bits(np.bincount(symbols)) if symbols.size else 0.0


def _inspect_entry(entry: Entry, payload: memoryview) -> dict[str, Any]:
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
        "side_bytes": side,  # codebooks, scales, zero points
        "code_table_bytes": 0,  # Huffman code lengths and block offsets
        "positions_entropy_bits": None,
        "values_entropy_bits": None,
        "positions_symbols": None,
        "values_symbols": None,
    }
    nonzero = entry.size
    if isinstance(entry.values, Blob):
        stats["values_bytes"] = entry.values.length
    else:
        symbols = read_stream(payload, entry.values, f"{where}: values stream")
        table = entry.values.table_bytes
        stats["values_bytes"] = entry.values.blob.length - table
        stats["table_bytes"] += table
        stats["code_table_bytes"] += table
        stats["values_entropy_bits"] = _histogram_bits(symbols)
        stats["values_symbols"] = entry.values.count
    pos = entry.positions
    if pos is not None:
        nonzero = pos.count
        stats["positions_method"] = pos.method
        if pos.stream is None:
            stats["positions_bytes"] = pos.blob.length
            read_positions(payload, pos, entry.size, f"{where}: positions stream")
            stats["positions_entropy_bits"] = huffman.entropy_bits(
                np.array([pos.count, entry.size - pos.count])
            )
        else:
            symbols = read_stream(payload, pos.stream, f"{where}: positions stream")
            table = pos.stream.table_bytes
            stats["positions_bits"] = pos.bits
            stats["positions_bytes"] = pos.stream.blob.length - table
            stats["table_bytes"] += table
            stats["code_table_bytes"] += table
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
    parsed = guarded(lambda: parse(data, max_elements))
    return [
        guarded(lambda e=e: _inspect_entry(e, parsed.payload), f"tensor {e.name!r}")
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


def container_parts(source: str | os.PathLike | bytes, rows: list[dict[str, Any]] | None = None,
                    *, max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, int]:
    """Every byte of a file by part; the parts sum to the file size. ``overhead`` is what is
    neither a coded stream, a codebook (or scale) nor a raw tensor: the container's header,
    metadata, section table and digest plus the Huffman code tables."""
    data = (
        source if isinstance(source, bytes | bytearray | memoryview) else Path(source).read_bytes()
    )
    parsed = guarded(lambda: parse(data, max_elements))
    rows = inspect_cpz(data, max_elements=max_elements) if rows is None else rows
    parts = {f"container_{k}": v for k, v in parsed.layout.items()}
    parts["code_tables"] = sum(r["code_table_bytes"] for r in rows)
    parts["side_arrays"] = sum(r["side_bytes"] for r in rows if r["kind"] != "raw")
    parts["positions"] = sum(r["positions_bytes"] for r in rows)
    parts["values"] = sum(r["values_bytes"] for r in rows if r["kind"] != "raw")
    parts["raw_tensors"] = sum(r["values_bytes"] for r in rows if r["kind"] == "raw")
    parts["overhead"] = sum(parsed.layout.values()) + parts["code_tables"]
    parts["file"] = len(data)
    parts["version"] = parsed.version
    return parts
