"""Block-parallel decoding: every block of every stream advances one symbol per numpy call.

:func:`decode` checks one untrusted stream completely before decoding it;
:func:`decode_many` decodes many streams' blocks in one lock-step pass through stacked
lookup tables, and reports the first failing stream as :class:`StreamError`. Codes
longer than the primary table go through a canonical range search. The table budget
``_SHARED_TABLE_MAX`` and the kernel ``_lock_step`` are read from this module at call
time, so tests replace them here. Imports :mod:`.limits` and :mod:`.codes`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .codes import first_codes, reverse_bits, validate_lengths
from .limits import DEFAULT_BLOCK_SIZE, HuffmanError, check_block_size

_TABLE_BITS = 16  # primary lookup table: 2**16 entries stays in L2
_LONG = 0  # table marker: code longer than the primary table, resolve canonically
# Advance for an invalid code: larger than any block can span (MAX_BLOCK_SIZE *
# MAX_CODE_LEN bits), so a lane that hits one can never land on its block end.
_INVALID = 1 << 22
# decode_many stacks the lookup tables (5-8 bytes an entry) of the streams it decodes
# together: 2**20 entries always, more only in proportion to the symbols, and never more
# than 2**26, so that uint32 table bases cannot overflow.
_SHARED_TABLE_MIN = 1 << 20
_SHARED_TABLE_MAX = 1 << 26


def _output_dtype(alphabet: int) -> np.dtype:
    if alphabet <= 1 << 8:
        return np.dtype(np.uint8)
    if alphabet <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


class StreamError(HuffmanError):
    """A :class:`HuffmanError` in one stream of a :func:`decode_many` batch.

    ``index`` is the stream's position in the batch; ``error`` is what :func:`decode`
    raises for that stream alone.
    """

    def __init__(self, index: int, error: HuffmanError) -> None:
        super().__init__(f"stream {index}: {error}")
        self.index = index
        self.error = error


def decode(
    data: bytes | memoryview | np.ndarray,
    lengths: np.ndarray,
    n_symbols: int,
    block_offsets: np.ndarray,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> np.ndarray:
    """Decode ``n_symbols`` symbols written by :func:`encode`.

    Every input is validated against the data before anything proportional to
    ``n_symbols`` is allocated, and the loop runs at most ``min(n_symbols, block_size)``
    iterations, so hostile input cannot hang or exhaust memory. Returns uint8, uint16 or
    uint32 symbols depending on the alphabet size; raises HuffmanError on any mismatch.
    """
    stream = _check(data, lengths, n_symbols, block_offsets, block_size)
    if stream.count == 0:
        return np.zeros(0, dtype=stream.dtype)
    try:
        return _decode_lanes([stream])[0]
    except StreamError as exc:
        raise exc.error from None


def decode_many(streams: Iterable[Sequence]) -> list[np.ndarray]:
    """Decode many streams, each given as the arguments of :func:`decode`, in one pass.

    Returns what :func:`decode` returns for each stream, with the same checks. The blocks
    of all streams advance in lock step together, so many small streams pay numpy's
    per-call overhead once, ``max(min(n, block_size))`` iterations, instead of once per
    stream. Only streams with codes longer than 16 bits, or whose lookup tables would
    exceed a budget proportional to the symbols, are decoded on their own. Raises
    :class:`StreamError` for the first (lowest-index) stream that fails.
    """
    checked: list[_Checked] = []
    failure = None
    for i, args in enumerate(streams):
        try:
            checked.append(_check(*args))
        except HuffmanError as exc:
            failure = StreamError(i, exc)
            break
    # The streams before a bad one are still decoded, so that an error in one of them wins.
    out = _decode_checked(checked)
    if failure is not None:
        raise failure
    return out


@dataclass(frozen=True, eq=False)
class _Checked:
    """A stream that passed every check that needs no decoding; only its blocks can still fail."""

    raw: np.ndarray  # uint8 bitstream
    lens: np.ndarray  # uint8 code length per symbol
    count: int
    offsets: np.ndarray  # int64 bit offset of each block, then the total
    block_size: int
    dtype: np.dtype  # of the decoded symbols
    max_len: int  # longest code; 0 for an empty stream

    @property
    def table_bits(self) -> int:
        return min(self.max_len, _TABLE_BITS)


def _check(
    data: bytes | memoryview | np.ndarray,
    lengths: np.ndarray,
    n_symbols: int,
    block_offsets: np.ndarray,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> _Checked:
    lens = validate_lengths(lengths)
    check_block_size(block_size)
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    raw = raw.reshape(-1).view(np.uint8)
    offsets = _check_offsets(block_offsets, n_symbols, block_size, raw)
    dtype = _output_dtype(lens.size)
    count = int(n_symbols)
    if count == 0:
        return _Checked(raw, lens, 0, offsets, block_size, dtype, 0)
    used = lens[lens > 0]
    if used.size == 0:
        raise HuffmanError("stream has symbols but no symbol has a code")
    max_len = int(used.max())
    _check_block_spans(offsets, count, block_size, int(used.min()), max_len)
    _check_padding(raw, int(offsets[-1]))
    return _Checked(raw, lens, count, offsets, block_size, dtype, max_len)


def _decode_checked(checked: list[_Checked]) -> list[np.ndarray]:
    """Decode checked streams: those with short codes together, the others one by one."""
    out = [np.zeros(0, dtype=s.dtype) for s in checked]
    # Shared tables cost 2**max_len entries per stream; a budget proportional to the
    # symbols keeps many tiny streams with long codes from exhausting memory.
    budget = min(max(_SHARED_TABLE_MIN, 4 * sum(s.count for s in checked)), _SHARED_TABLE_MAX)
    shared: list[int] = []
    alone: list[int] = []
    used = 0
    for i, s in enumerate(checked):
        if s.count == 0:
            continue
        if s.max_len <= _TABLE_BITS and used + (1 << s.max_len) <= budget:
            shared.append(i)
            used += 1 << s.max_len
        else:
            alone.append(i)
    failure = None
    if shared:
        try:
            for i, symbols in zip(shared, _decode_lanes([checked[i] for i in shared]), strict=True):
                out[i] = symbols
        except StreamError as exc:
            failure = StreamError(shared[exc.index], exc.error)
    for i in alone:
        if failure is not None and i > failure.index:
            break
        try:
            out[i] = _decode_lanes([checked[i]])[0]
        except StreamError as exc:
            raise StreamError(i, exc.error) from None
    if failure is not None:
        raise failure
    return out


def _decode_lanes(streams: list[_Checked]) -> list[np.ndarray]:
    """Decode nonempty streams in one lock-step pass whose lanes are all their blocks.

    Lanes carry global bit positions into the concatenated bitstreams and index their
    stream's lookup table through a per-lane mask and base. Codes longer than the table
    need the canonical resolver, which knows one code only, so such a stream comes alone.
    """
    dtype = max((s.dtype for s in streams), key=lambda d: d.itemsize)
    win, bit_base = _windows(streams)
    n_blocks = np.array([s.offsets.size - 1 for s in streams], dtype=np.int64)
    first_lane = np.cumsum(n_blocks) - n_blocks
    stream_of = np.repeat(np.arange(len(streams)), n_blocks)
    start = np.concatenate([s.offsets[:-1] + b for s, b in zip(streams, bit_base, strict=True)])
    end = np.concatenate([s.offsets[1:] + b for s, b in zip(streams, bit_base, strict=True)])
    count = np.concatenate(
        [_block_counts(s.count, s.offsets.size - 1, s.block_size) for s in streams]
    )
    tsym, tlen, bits, table_base = _stacked_tables(streams, dtype)
    resolve = None
    if streams[0].max_len > _TABLE_BITS:
        resolve = _long_code_resolver(streams[0].lens, win, streams[0].max_len)

    # Lanes sorted by falling symbol count: the lanes still decoding at any row are a prefix.
    order = np.argsort(-count, kind="stable")
    pos = start[order]
    if len(streams) == 1:
        mask, base = np.uint32((1 << int(bits[0])) - 1), None
    else:
        mask = ((1 << bits) - 1).astype(np.uint32)[stream_of[order]]
        base = table_base.astype(np.uint32)[stream_of[order]]
    stops = np.unique(count)  # rows [previous stop, stop) have every lane of count >= stop
    active = (count.size - np.searchsorted(count[order][::-1], stops)).tolist()
    # Row r holds one symbol of each lane still decoding, so rows shrink and the output
    # takes no more room than the symbols; row_start[r] is where row r begins in it.
    flat = np.empty(int(count.sum()), dtype=dtype)
    row_start = np.empty(int(stops[-1]), dtype=np.int64)
    row, offset = 0, 0
    for stop, lanes in zip(stops.tolist(), active, strict=True):
        view = flat[offset : offset + (stop - row) * lanes].reshape(stop - row, lanes)
        _lock_step(win, pos, view, tsym, tlen, mask, base, resolve)
        row_start[row:stop] = offset + np.arange(stop - row, dtype=np.int64) * lanes
        row, offset = stop, offset + view.size

    bad = np.flatnonzero(pos != end[order])
    if bad.size:
        lane = int(order[bad].min())  # the original order is by stream, then block
        k = int(stream_of[lane])
        block = lane - int(first_lane[k])
        message = f"block {block}: bitstream does not decode to its recorded length"
        raise StreamError(k, HuffmanError(message))
    column = np.empty_like(order)  # of each lane in the rows
    column[order] = np.arange(order.size)
    return [
        _stream_symbols(s, flat, row_start, column[lane : lane + s.offsets.size - 1])
        for s, lane in zip(streams, first_lane.tolist(), strict=True)
    ]


def _windows(streams: list[_Checked]) -> tuple[np.ndarray, list[int]]:
    """Unaligned 4-byte little-endian windows at every byte of the concatenated bitstreams
    (made native once), and the bit position where each stream starts."""
    sizes = np.array([s.raw.size for s in streams], dtype=np.int64)
    byte_base = (np.cumsum(sizes) - sizes).tolist()
    buf = np.zeros(int(sizes.sum()) + 4, dtype=np.uint8)
    for s, b in zip(streams, byte_base, strict=True):
        buf[b : b + s.raw.size] = s.raw
    win = np.ndarray((buf.size - 3,), dtype="<u4", buffer=buf, strides=(1,)).astype(np.uint32)
    return win, [8 * b for b in byte_base]


def _stacked_tables(
    streams: list[_Checked], dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every stream's symbol and length tables, end to end; their widths and start indices."""
    bits = np.array([s.table_bits for s in streams], dtype=np.int64)
    table_base = np.cumsum(1 << bits) - (1 << bits)
    tsym = np.empty(int((1 << bits).sum()), dtype=dtype)
    tlen = np.empty(tsym.size, dtype=np.int32)
    for s, b, w in zip(streams, table_base.tolist(), bits.tolist(), strict=True):
        _fill_table(s.lens, w, tsym[b : b + (1 << w)], tlen[b : b + (1 << w)])
    return tsym, tlen, bits, table_base


def _stream_symbols(
    stream: _Checked, flat: np.ndarray, row_start: np.ndarray, columns: np.ndarray
) -> np.ndarray:
    """A stream's symbols in order, gathered from the rows (``columns``: of its blocks)."""
    symbols = np.empty(stream.count, dtype=stream.dtype)
    size = stream.block_size
    full = stream.count // size
    if full:
        blocks = symbols[: full * size].reshape(full, size)
        blocks[...] = flat[row_start[:size, None] + columns[:full]].T
    if full < columns.size:
        symbols[full * size :] = flat[row_start[: stream.count - full * size] + columns[full]]
    return symbols


def _block_counts(n: int, n_blocks: int, block_size: int) -> np.ndarray:
    counts = np.full(n_blocks, block_size, dtype=np.int64)
    counts[-1] = n - (n_blocks - 1) * block_size
    return counts


def _check_offsets(
    block_offsets: np.ndarray, n_symbols: int, block_size: int, raw: np.ndarray
) -> np.ndarray:
    if not isinstance(n_symbols, int | np.integer) or n_symbols < 0:
        raise HuffmanError("symbol count must be a non-negative integer")
    n_symbols = int(n_symbols)
    # Every code is at least one bit long, which bounds the output by the input size.
    if n_symbols > 8 * raw.size:
        raise HuffmanError(f"{n_symbols} symbols cannot fit in {raw.size} bytes")
    offsets = np.asarray(block_offsets)
    if offsets.ndim != 1 or not (np.issubdtype(offsets.dtype, np.integer) or offsets.size == 0):
        raise HuffmanError("block offsets must be a 1-D integer array")
    n_blocks = -(-n_symbols // block_size)
    if offsets.size != n_blocks + 1:
        raise HuffmanError(f"expected {n_blocks + 1} block offsets, got {offsets.size}")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise HuffmanError("block offsets must start at 0 and never decrease")
    if (int(offsets[-1]) + 7) // 8 != raw.size:
        raise HuffmanError(f"stream of {int(offsets[-1])} bits does not fill {raw.size} bytes")
    return offsets


def _check_block_spans(
    offsets: np.ndarray, n: int, block_size: int, min_len: int, max_len: int
) -> None:
    counts = _block_counts(n, offsets.size - 1, block_size)
    spans = np.diff(offsets)
    bad = np.flatnonzero((spans < counts * min_len) | (spans > counts * max_len))
    if bad.size:
        raise HuffmanError(
            f"block {int(bad[0])}: bit length {int(spans[bad[0]])} impossible for its symbols"
        )


def _check_padding(raw: np.ndarray, total_bits: int) -> None:
    if total_bits % 8 and int(raw[-1]) >> (total_bits % 8):
        raise HuffmanError("nonzero padding bits after the last code")


def _fill_table(lens: np.ndarray, table_bits: int, tsym: np.ndarray, tlen: np.ndarray) -> None:
    """Fill lookup tables indexed by the next ``table_bits`` stream bits: symbol and code length.

    Read MSB-first, the canonical codes tile the table in (length, symbol) order, each
    code over ``2**(table_bits - length)`` entries; stream bits come LSB-first, so the
    table is that tiling seen through a bit reversal of the index.
    """
    order = np.argsort(lens, kind="stable")  # stable: ties by symbol, as canonical codes
    order = order[lens[order] > 0]
    sorted_lens = lens[order].astype(np.int64)
    short = sorted_lens <= table_bits
    reps = 1 << (table_bits - sorted_lens[short])
    # Whatever no short code covers belongs to long codes, or to no code at all.
    rest = (1 << table_bits) - int(reps.sum())
    rest_len = _LONG if not short.all() else _INVALID
    reps = np.append(reps, rest)
    perm = _bit_reversal(table_bits)
    tsym[:] = np.repeat(np.append(order[short], 0).astype(tsym.dtype), reps)[perm]
    tlen[:] = np.repeat(np.append(sorted_lens[short], rest_len).astype(np.int32), reps)[perm]


@functools.cache
def _bit_reversal(bits: int) -> np.ndarray:
    """Index i -> i with its low ``bits`` bits reversed (its own inverse)."""
    perm = reverse_bits(np.arange(1 << bits), bits).astype(np.intp)
    perm.flags.writeable = False
    return perm


_REV12 = reverse_bits(np.arange(1 << 12), 12).astype(np.uint32)


def _long_code_resolver(lens: np.ndarray, win: np.ndarray, max_len: int) -> Callable:
    """Slow path for codes longer than the primary table: canonical range search.

    Left-aligned to max_len bits, the codes of each length occupy one contiguous range
    and the ranges ascend with length, so the code length is a searchsorted on the
    range ends and the symbol is an offset into the (length, symbol)-sorted list.
    """
    lens64 = lens.astype(np.int64)
    first = first_codes(lens64)
    order = np.lexsort((np.arange(lens64.size), lens64))
    order = order[lens64[order] > 0]
    count = np.bincount(lens64[order], minlength=max_len + 1)
    first_index = np.concatenate([[0], np.cumsum(count)])[:-1]
    ls = np.arange(1, max_len + 1)
    limits = (first[ls] + count[ls]) << (max_len - ls)
    mask = np.uint32((1 << max_len) - 1)

    def resolve(pos: np.ndarray, step: np.ndarray, row: np.ndarray) -> None:
        lanes = np.flatnonzero(step == _LONG)
        if lanes.size == 0:
            return
        p = pos[lanes]
        v = (np.take(win, p >> 3, mode="clip") >> (p & 7).astype(np.uint32)) & mask
        msb = ((_REV12[v & 0xFFF] << 12) | _REV12[v >> 12]).astype(np.int64) >> (24 - max_len)
        li = np.searchsorted(limits, msb, side="right")
        ok = li < max_len
        length = np.minimum(li, max_len - 1) + 1
        idx = first_index[length] + (msb >> (max_len - length)) - first[length]
        row[lanes] = order[np.clip(idx, 0, order.size - 1)]
        step[lanes] = np.where(ok, length, _INVALID)

    return resolve


def _lock_step(
    win: np.ndarray,
    pos: np.ndarray,
    out: np.ndarray,
    tsym: np.ndarray,
    tlen: np.ndarray,
    mask: np.ndarray | np.uint32,
    base: np.ndarray | None,
    resolve: Callable | None,
) -> None:
    """Decode one row of ``out`` (rows x lanes) per step for the first ``out.shape[1]`` lanes.

    A lane's table index is its next bits masked to its table width, plus its table base.
    """
    n_lanes = out.shape[1]
    if n_lanes == 0:
        return
    p = pos[:n_lanes]
    if isinstance(mask, np.ndarray):
        mask = mask[:n_lanes]
    if base is not None:
        base = base[:n_lanes]
    byte = np.empty(n_lanes, dtype=np.int64)
    peek = np.empty(n_lanes, dtype=np.uint32)
    bit = np.empty(n_lanes, dtype=np.uint32)
    step = np.empty(n_lanes, dtype=np.int32)
    for row in out:  # loop over symbols *within* a block; lanes are vectorized
        np.right_shift(p, 3, out=byte)
        # mode="clip": a corrupt lane may run past the data; it then fails the end check.
        win.take(byte, out=peek, mode="clip")
        np.bitwise_and(p, 7, out=bit, casting="unsafe")
        np.right_shift(peek, bit, out=peek)
        np.bitwise_and(peek, mask, out=peek)
        if base is not None:
            np.add(peek, base, out=peek)
        # Indices are in range by construction; mode="clip" lets take write ``out`` unbuffered.
        tsym.take(peek, out=row, mode="clip")
        tlen.take(peek, out=step, mode="clip")
        if resolve is not None:
            resolve(p, step, row)
        np.add(p, step, out=p)
