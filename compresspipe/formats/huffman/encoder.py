"""Bit-level encoding: symbols to an LSB-first bitstream with a recorded offset per block.

:func:`encode` writes every symbol's canonical code (from :mod:`.codes`) at its bit
position, all at once with numpy; :func:`choose_block_size` picks the block size that
gives the decoder enough lanes. Imports :mod:`.limits` and :mod:`.codes`.
"""

from __future__ import annotations

import numpy as np

from .codes import canonical_codes, reverse_bits, validate_lengths
from .limits import DEFAULT_BLOCK_SIZE, HuffmanError, check_block_size

_LANE_TARGET = 2048  # lanes per lock-step iteration where numpy call overhead stops dominating


def choose_block_size(n_symbols: int) -> int:
    """Largest power of two giving at least _LANE_TARGET lanes, clipped to [1024, 4096].

    More lanes amortize numpy's per-call overhead; below 1024 symbols per block the
    2-byte-per-block offset table would cost more than ~0.5% of a typical stream.
    """
    want = max(1, n_symbols // _LANE_TARGET)
    return int(min(4096, max(1024, 1 << (want.bit_length() - 1))))


def encode(
    symbols: np.ndarray, lengths: np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE
) -> tuple[bytes, np.ndarray]:
    """Huffman-code ``symbols`` with the canonical code for ``lengths``.

    Returns the bitstream and the int64 bit offsets of each block start plus the total
    bit count (``n_blocks + 1`` entries), block k holding symbols
    ``[k * block_size, (k + 1) * block_size)``.
    """
    lens_table = validate_lengths(lengths)
    check_block_size(block_size)
    sym = np.asarray(symbols)
    if sym.ndim != 1 or not (np.issubdtype(sym.dtype, np.integer) or sym.size == 0):
        raise HuffmanError("symbols must be a 1-D integer array")
    if sym.size == 0:
        return b"", np.zeros(1, dtype=np.int64)
    if sym.min() < 0 or sym.max() >= lens_table.size:
        raise HuffmanError(f"symbols must lie in [0, {lens_table.size})")
    lens = lens_table[sym]
    if lens.min() == 0:
        raise HuffmanError("stream contains a symbol whose code length is 0")
    starts = np.cumsum(lens, dtype=np.int64)
    total_bits = int(starts[-1])
    np.subtract(starts, lens, out=starts)  # in place: these arrays are the big ones
    offsets = np.append(starts[::block_size], total_bits)
    rcodes = reverse_bits(canonical_codes(lens_table), lens_table)[sym]
    return _pack_lsb_first(rcodes, lens, starts, total_bits), offsets


def _pack_lsb_first(
    rcodes: np.ndarray, lens: np.ndarray, starts: np.ndarray, total_bits: int
) -> bytes:
    """OR bit-reversed codes into little-endian 64-bit words at their start offsets.

    ``rcodes`` (uint64) is overwritten.
    """
    n_words = (total_bits + 63) // 64
    shift = (starts & 63).astype(np.uint8)
    spill = np.flatnonzero(shift + lens > 64)  # uint8 is enough: at most 63 + 24
    spill_bits = rcodes[spill] >> (np.uint64(64) - shift[spill])
    np.left_shift(rcodes, shift, out=rcodes)  # bits pushed past 64 are the spill above
    # Codes never overlap, so OR-reducing the codes that start in each word is exact.
    bounds = np.searchsorted(starts, np.arange(n_words + 1, dtype=np.int64) * 64)
    nonempty = np.flatnonzero(bounds[:-1] < bounds[1:])
    words = np.zeros(n_words + 1, dtype=np.uint64)
    words[nonempty] = np.bitwise_or.reduceat(rcodes, bounds[nonempty])
    # At most one code straddles each word boundary, so these indices are unique.
    words[(starts[spill] >> 6) + 1] |= spill_bits
    return words.astype("<u8").tobytes()[: (total_bits + 7) // 8]
