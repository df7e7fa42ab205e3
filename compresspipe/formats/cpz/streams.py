"""Huffman-coded integer streams, the unit every coded part of a ``.cpz`` tensor is made of.

:class:`HuffmanStream` codes one stream of symbols, one or two per code, with its own
canonical code (:mod:`compresspipe.formats.huffman`). :func:`stream_choice` gives the exact
size of the cheaper grouping without coding anything; :func:`ungrouped` turns decoded codes
back into symbols.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import huffman
from .container import MAX_CODEBOOK, MAX_PAIR_ALPHABET, WRITE_MAX_CODE_LEN


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
            group = stream_choice(symbols, alphabet)[1]
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
        return ungrouped(coded, self.alphabet, self.group, self.count)

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


def ungrouped(coded: np.ndarray, alphabet: int, group: int, count: int) -> np.ndarray:
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


def stream_choice(symbols: np.ndarray, alphabet: int) -> tuple[int, int]:
    """(bytes, group) of the smaller way to code ``symbols``: one or two per code."""
    options = [(_stream_nbytes(_histogram(symbols, alphabet)), 1)]
    # Pairs save under one bit per symbol, so a pair table larger than that cannot pay off.
    if alphabet**2 <= MAX_PAIR_ALPHABET and alphabet**2 - alphabet < symbols.size // 8:
        pairs = _grouped(symbols, alphabet, 2)
        options.append((_stream_nbytes(_histogram(pairs, alphabet**2)), 2))
    return min(options)
