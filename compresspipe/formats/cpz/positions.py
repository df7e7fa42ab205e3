"""Sparse position coding: where the nonzeros of a flattened tensor are.

:class:`PositionsEncoding` and its three methods: ``relidx`` (Deep Compression's relative
index, the gaps before each nonzero) and ``runs`` (alternating zero/nonzero run lengths),
both escape-coded (:func:`escape`, :func:`unescape`) into a Huffman stream, and ``bitmap``
(one bit per element). :func:`position_costs` prices each method exactly,
:func:`encode_positions` picks the smallest; :func:`decode_positions`,
:func:`positions_from_symbols` and :func:`positions_from_bitmap` decode and check them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .container import MAX_ESCAPE_BITS, POSITION_METHODS
from .streams import HuffmanStream, stream_choice


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


def escape(values: np.ndarray, bits: int) -> np.ndarray:
    """Values as symbols in [0, 2**bits): the top symbol E = 2**bits - 1 is a filler that
    adds E to the next symbol (Deep Compression's filler zero, but carrying no value)."""
    escape = (1 << bits) - 1
    fillers = values // escape
    out = np.full(values.size + int(fillers.sum()), escape, dtype=np.uint16)
    out[np.cumsum(fillers + 1) - 1] = values % escape
    return out


def unescape(symbols: np.ndarray, bits: int) -> np.ndarray:
    escape = (1 << bits) - 1
    if symbols.size and symbols[-1] == escape:
        raise ValueError("stream ends with a filler")
    final = np.flatnonzero(symbols != escape)
    fillers = np.diff(final, prepend=-1) - 1
    return fillers * escape + symbols[final].astype(np.int64)


def gaps(nonzero: np.ndarray) -> np.ndarray:
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
        nbytes, group = stream_choice(escape(values, bits), 1 << bits)
        if best is None or nbytes < best[0]:
            best = (nbytes, bits, group)
    return best


def position_costs(mask: np.ndarray) -> dict[str, int]:
    """Exact encoded bytes of each positions method for a boolean nonzero mask."""
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    nonzero = np.flatnonzero(mask)
    return {
        "relidx": _best_escape(gaps(nonzero))[0],
        "runs": _best_escape(_runs(mask, nonzero))[0],
        "bitmap": (mask.size + 7) // 8,
    }


def encode_positions(mask: np.ndarray, method: str | None = None) -> PositionsEncoding:
    """Encode the True positions of a flattened mask with ``method``, or the smallest one."""
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    nonzero = np.flatnonzero(mask)
    if method is None:
        costs = position_costs(mask)
        method = min(POSITION_METHODS, key=lambda m: (costs[m], POSITION_METHODS.index(m)))
    if method == "bitmap":
        bitmap = np.packbits(mask, bitorder="little").tobytes()
        return PositionsEncoding("bitmap", int(nonzero.size), bitmap=bitmap)
    if method not in ("relidx", "runs"):
        raise ValueError(f"unknown positions method {method!r}")
    values = gaps(nonzero) if method == "relidx" else _runs(mask, nonzero)
    _, bits, group = _best_escape(values)
    stream = HuffmanStream.from_symbols(escape(values, bits), 1 << bits, group)
    return PositionsEncoding(method, int(nonzero.size), bits, stream)


def decode_positions(positions: PositionsEncoding, size: int) -> np.ndarray:
    """Flat nonzero positions (int64, ascending) of a tensor with ``size`` elements."""
    if positions.stream is None:
        return positions_from_bitmap(positions.bitmap, positions.count, size)
    symbols = positions.stream.decode()
    return positions_from_symbols(positions.method, symbols, positions.bits, positions.count, size)


def positions_from_symbols(
    method: str, symbols: np.ndarray, bits: int, count: int, size: int
) -> np.ndarray:
    """Flat nonzero positions (int64, ascending) from a decoded relidx/runs stream."""
    values = unescape(symbols, bits)
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


def positions_from_bitmap(bitmap: memoryview | bytes, count: int, size: int) -> np.ndarray:
    raw = np.frombuffer(bitmap, dtype=np.uint8)
    if size % 8 and int(raw[-1]) >> (size % 8):
        raise ValueError("nonzero padding bits")
    positions = np.flatnonzero(np.unpackbits(raw, count=size, bitorder="little"))
    if positions.size != count:
        raise ValueError(f"bitmap has {positions.size} set bits, header says {count}")
    return positions
