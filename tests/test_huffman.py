"""Canonical Huffman coding: optimality, length limits, canonical codes, bit-exact round trips."""

from __future__ import annotations

import numpy as np
import pytest

from compresspipe.formats import huffman
from compresspipe.formats.huffman import HuffmanError, decoder

FIB = [1, 1]
while len(FIB) < 40:
    FIB.append(FIB[-1] + FIB[-2])


def _brute_force_cost(counts: np.ndarray, max_len: int) -> int:
    """Cheapest total bits over every length vector in [1, max_len]^n with Kraft sum <= 1."""
    n = counts.size
    grid = np.indices((max_len,) * n).reshape(n, -1).T + 1
    kraft = np.sum(2.0 ** (max_len - grid), axis=1)
    feasible = grid[kraft <= 2.0**max_len]
    return int((feasible @ counts).min())


def _round_trip(symbols: np.ndarray, alphabet: int, block_size: int | None = None) -> np.ndarray:
    counts = np.bincount(symbols, minlength=alphabet)
    lengths = huffman.code_lengths(counts)
    bs = block_size or huffman.choose_block_size(symbols.size)
    data, offsets = huffman.encode(symbols, lengths, bs)
    assert len(data) * 8 - 8 < offsets[-1] <= len(data) * 8 or symbols.size == 0
    assert offsets[-1] == huffman.coded_bits(counts, lengths)
    out = huffman.decode(data, lengths, symbols.size, offsets, bs)
    np.testing.assert_array_equal(out, symbols)
    return out


def _is_prefix_free(codes: np.ndarray, lengths: np.ndarray) -> bool:
    words = sorted(
        format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths, strict=True) if n > 0
    )
    return all(not b.startswith(a) for a, b in zip(words, words[1:], strict=False))


# --------------------------------------------------------------------------- code lengths


def test_textbook_example_costs_224_bits() -> None:
    counts = np.array([45, 13, 12, 16, 9, 5])  # CLRS 16.3: a..f
    lengths = huffman.code_lengths(counts)
    assert huffman.coded_bits(counts, lengths) == 224
    assert lengths.tolist() == [1, 3, 3, 3, 4, 4]


@pytest.mark.parametrize("seed", range(12))
def test_lengths_match_brute_force_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 7))
    counts = rng.integers(1, 50, n) ** int(rng.integers(1, 3))
    lengths = huffman.code_lengths(counts)
    assert huffman.coded_bits(counts, lengths) == _brute_force_cost(counts, n - 1)


@pytest.mark.parametrize(
    ("counts", "max_len"), [(FIB[:6], 3), (FIB[:7], 3), ([1, 2, 4, 8, 16, 32], 4)]
)
def test_length_limited_lengths_match_brute_force(counts: list[int], max_len: int) -> None:
    counts = np.array(counts)
    lengths = huffman.code_lengths(counts, max_len=max_len)
    assert lengths.max() <= max_len
    assert huffman.coded_bits(counts, lengths) == _brute_force_cost(counts, max_len)


@pytest.mark.parametrize("seed", range(5))
def test_package_merge_equals_huffman_when_limit_is_loose(seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights = np.sort(rng.integers(1, 1000, 300))
    huff = huffman._huffman_depths(weights)
    merged = huffman._package_merge(weights, max_len=24)
    assert int(merged @ weights) == int(huff @ weights)


def test_fibonacci_frequencies_reach_the_maximum_length() -> None:
    counts = np.array(FIB[:25])
    lengths = huffman.code_lengths(counts)
    assert lengths.max() == huffman.MAX_CODE_LEN == 24


@pytest.mark.parametrize("max_len", [8, 12, 24])
def test_fibonacci_frequencies_are_length_limited(max_len: int) -> None:
    counts = np.array(FIB[:34])  # unconstrained Huffman would need 33 bits
    lengths = huffman.code_lengths(counts, max_len=max_len)
    assert lengths.max() == max_len
    kraft = np.sum(2.0 ** -lengths.astype(float))
    assert kraft == pytest.approx(1.0)
    unlimited = huffman._huffman_depths(counts.astype(np.int64))
    assert huffman.coded_bits(counts, lengths) >= int(unlimited @ counts)


def test_zero_counts_get_no_code_and_a_lone_symbol_gets_one_bit() -> None:
    assert huffman.code_lengths(np.array([0, 7, 0])).tolist() == [0, 1, 0]
    assert huffman.code_lengths(np.array([0, 0])).tolist() == [0, 0]
    assert huffman.code_lengths(np.array([], dtype=np.int64)).size == 0
    assert huffman.code_lengths(np.array([3, 0, 3])).tolist() == [1, 0, 1]


def test_code_lengths_rejects_bad_input() -> None:
    with pytest.raises(HuffmanError):
        huffman.code_lengths(np.array([1, -1]))
    with pytest.raises(HuffmanError):
        huffman.code_lengths(np.array([1.0, 2.0]))
    with pytest.raises(HuffmanError):
        huffman.code_lengths(np.ones(5, dtype=np.int64), max_len=2)  # 5 symbols > 2**2


# --------------------------------------------------------------------------- canonical codes


def test_canonical_codes_follow_length_then_symbol_order() -> None:
    lengths = np.array([3, 3, 3, 3, 3, 2, 4, 4])  # RFC 1951 section 3.2.2 example
    codes = huffman.canonical_codes(lengths)
    assert codes.tolist() == [0b010, 0b011, 0b100, 0b101, 0b110, 0b00, 0b1110, 0b1111]


@pytest.mark.parametrize("seed", range(5))
def test_canonical_codes_are_prefix_free(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 100, 200) ** 2
    lengths = huffman.code_lengths(counts)
    assert _is_prefix_free(huffman.canonical_codes(lengths), lengths)


@pytest.mark.parametrize(
    "lengths",
    [[1, 1, 1], [0, 25], [-1, 1], [2, 2, 2, 2, 2], np.array([1.0, 1.0])],
)
def test_invalid_code_lengths_are_rejected(lengths: list[int]) -> None:
    with pytest.raises(HuffmanError):
        huffman.validate_lengths(np.asarray(lengths))


def test_incomplete_codes_are_valid() -> None:
    huffman.validate_lengths(np.array([1]))
    huffman.validate_lengths(np.array([2, 2, 2, 0]))


def test_entropy_bound() -> None:
    assert huffman.entropy_bits(np.full(16, 10)) == pytest.approx(160 * 4)
    assert huffman.entropy_bits(np.array([5, 0])) == 0.0
    counts = np.array([45, 13, 12, 16, 9, 5])
    bound = huffman.entropy_bits(counts)
    assert bound <= 224 < bound + counts.sum()


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("n", [0, 1, 2, 15, 16, 17, 1023, 1024, 1025, 5000, 70_001])
def test_round_trip_around_block_boundaries(n: int) -> None:
    rng = np.random.default_rng(n)
    p = np.exp(-np.arange(16) / 2.0)
    _round_trip(rng.choice(16, n, p=p / p.sum()), 16, block_size=1024)


@pytest.mark.parametrize("block_size", [16, 64, 4096, 65536])
def test_round_trip_any_block_size(block_size: int) -> None:
    rng = np.random.default_rng(block_size)
    _round_trip(rng.integers(0, 300, 20_000), 300, block_size=block_size)


def test_round_trip_single_distinct_symbol() -> None:
    symbols = np.full(3000, 5)
    _round_trip(symbols, 9)
    counts = np.bincount(symbols, minlength=9)
    data, _ = huffman.encode(symbols, huffman.code_lengths(counts))
    assert len(data) == 3000 // 8  # one bit per symbol


def test_round_trip_one_symbol_total() -> None:
    _round_trip(np.array([3]), 4)


def test_round_trip_65536_distinct_symbols() -> None:
    rng = np.random.default_rng(1)
    symbols = np.concatenate([np.arange(1 << 16), rng.integers(0, 50, 100_000)])
    rng.shuffle(symbols)
    out = _round_trip(symbols, 1 << 16)
    assert out.dtype == np.uint16


def test_round_trip_codes_longer_than_the_lookup_table() -> None:
    counts = np.array(FIB[:25])  # lengths up to 24 > the 16-bit primary table
    symbols = np.repeat(np.arange(25), np.minimum(counts, 3000))
    np.random.default_rng(0).shuffle(symbols)
    lengths = huffman.code_lengths(counts)
    data, offsets = huffman.encode(symbols, lengths, 256)
    out = huffman.decode(data, lengths, symbols.size, offsets, 256)
    np.testing.assert_array_equal(out, symbols)


def test_round_trip_with_given_suboptimal_lengths() -> None:
    lengths = np.array([4, 4, 4, 4, 2, 0, 2, 3])
    symbols = np.array([0, 1, 2, 3, 4, 6, 7, 7, 4] * 100)
    data, offsets = huffman.encode(symbols, lengths, 64)
    np.testing.assert_array_equal(huffman.decode(data, lengths, symbols.size, offsets, 64), symbols)


def test_encode_rejects_symbols_without_code() -> None:
    with pytest.raises(HuffmanError):
        huffman.encode(np.array([0, 1]), np.array([1, 0]))
    with pytest.raises(HuffmanError):
        huffman.encode(np.array([0, 2]), np.array([1, 1]))


# --------------------------------------------------------------------------- hostile input


def _sample_stream() -> tuple[bytes, np.ndarray, np.ndarray, int]:
    rng = np.random.default_rng(7)
    symbols = rng.integers(0, 10, 1000)
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=10))
    data, offsets = huffman.encode(symbols, lengths, 128)
    return data, lengths, offsets, symbols.size


def test_decode_rejects_truncated_data() -> None:
    data, lengths, offsets, n = _sample_stream()
    with pytest.raises(HuffmanError):
        huffman.decode(data[:-1], lengths, n, offsets, 128)


def test_decode_rejects_inconsistent_offsets() -> None:
    data, lengths, offsets, n = _sample_stream()
    shifted = offsets.copy()
    shifted[3] += 1
    with pytest.raises(HuffmanError):
        huffman.decode(data, lengths, n, shifted, 128)
    with pytest.raises(HuffmanError):
        huffman.decode(data, lengths, n, offsets[:-1], 128)
    with pytest.raises(HuffmanError):
        huffman.decode(data, lengths, n + 1, offsets, 128)


def test_decode_rejects_more_symbols_than_bits() -> None:
    with pytest.raises(HuffmanError):
        huffman.decode(b"\x00", np.array([1, 1]), 9, np.array([0, 8]), 16)


def test_decode_rejects_unassigned_code() -> None:
    # lengths [1]: only the bit 0 is a code, so 0b1 is invalid.
    with pytest.raises(HuffmanError):
        huffman.decode(b"\x01", np.array([1]), 1, np.array([0, 1]), 16)
    # Same for a long-code table: 2**-24 of the code space is left unassigned.
    lengths = np.array([1] + list(range(2, 25)))
    with pytest.raises(HuffmanError):
        huffman.decode(b"\xff\xff\xff", lengths, 1, np.array([0, 24]), 16)


@pytest.mark.parametrize("seed", range(20))
def test_decode_of_random_bits_never_crashes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = huffman.code_lengths(rng.integers(0, 5, 12) ** 3)
    n = int(rng.integers(1, 400))
    data = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
    n_blocks = -(-n // 16)
    offsets = np.sort(rng.integers(0, len(data) * 8 + 1, n_blocks + 1))
    offsets[0], offsets[-1] = 0, len(data) * 8
    try:
        out = huffman.decode(data, lengths, n, offsets, 16)
    except HuffmanError:
        return
    assert out.size == n and int(out.max()) < lengths.size


# --------------------------------------------------------------------------- many streams at once


def _random_stream(rng: np.random.Generator) -> tuple[np.ndarray, tuple]:
    """Symbols and decode() arguments of a stream of random size, alphabet, skew and block size."""
    block_size = int(rng.choice([16, 32, 64, 1024]))
    n = int(
        rng.choice([0, 1, 2, block_size - 1, block_size, block_size + 1, 3 * block_size])
        if rng.random() < 0.5
        else rng.integers(1, 6 * block_size)
    )
    alphabet = int(rng.choice([1, 2, 5, 16, 300, 70_000]))  # uint8, uint16 and uint32 output
    used = rng.choice(alphabet, min(alphabet, int(rng.integers(1, 60))), replace=False)
    kind = rng.integers(3)
    if kind == 0:  # one distinct symbol
        symbols = np.full(n, used[0])
    elif kind == 1:
        symbols = rng.choice(used, n)
    else:  # geometric skew: long codes for rare symbols
        p = 0.5 ** np.arange(used.size)
        symbols = rng.choice(used, n, p=p / p.sum())
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=alphabet))
    data, offsets = huffman.encode(symbols, lengths, block_size)
    return symbols, (data, lengths, n, offsets, block_size)


def _fibonacci_stream() -> tuple[np.ndarray, tuple]:
    """Codes up to 24 bits long: decoded on its own with the long-code resolver."""
    counts = np.array(FIB[:25])
    symbols = np.repeat(np.arange(25), np.minimum(counts, 300))
    np.random.default_rng(0).shuffle(symbols)
    lengths = huffman.code_lengths(counts)
    data, offsets = huffman.encode(symbols, lengths, 64)
    return symbols, (data, lengths, symbols.size, offsets, 64)


@pytest.mark.parametrize("table_budget", [None, 1 << 10])
@pytest.mark.parametrize("seed", range(4))
def test_decode_many_equals_decode(
    seed: int, table_budget: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if table_budget is not None:  # small shared-table budget: some streams go on their own
        monkeypatch.setattr(decoder, "_SHARED_TABLE_MAX", table_budget)
    rng = np.random.default_rng(seed)
    streams = [_random_stream(rng) for _ in range(30)]
    streams.insert(int(rng.integers(0, 30)), _fibonacci_stream())
    out = huffman.decode_many([args for _, args in streams])
    assert len(out) == len(streams)
    for (symbols, args), got in zip(streams, out, strict=True):
        alone = huffman.decode(*args)
        assert got.dtype == alone.dtype
        np.testing.assert_array_equal(got, symbols)
        np.testing.assert_array_equal(got, alone)
    assert huffman.decode_many([]) == []


def test_decode_many_is_one_lock_step_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = []
    lock_step = decoder._lock_step
    monkeypatch.setattr(
        decoder, "_lock_step", lambda *a: rows.append(a[2].shape[0]) or lock_step(*a)
    )
    rng = np.random.default_rng(1)
    streams = [args for _, args in (_random_stream(rng) for _ in range(20))]
    huffman.decode_many(streams)
    # One row per symbol of the longest block, not one per symbol of every stream's blocks.
    assert sum(rows) == max(min(n, block_size) for _, _, n, _, block_size in streams)


def _shift_boundary(args: tuple, block: int) -> tuple:
    """Move the start of ``block`` one bit later: block - 1 then ends before its recorded end."""
    data, lengths, n, offsets, block_size = args
    shifted = offsets.copy()
    shifted[block] += 1
    return data, lengths, n, shifted, block_size


def _skewed_streams(count: int) -> list[tuple]:
    rng = np.random.default_rng(5)
    streams = []
    for _ in range(count):
        symbols = rng.choice(6, 500, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
        lengths = huffman.code_lengths(np.bincount(symbols, minlength=6))
        data, offsets = huffman.encode(symbols, lengths, 64)
        streams.append((data, lengths, symbols.size, offsets, 64))
    return streams


def test_corrupt_block_names_its_stream() -> None:
    streams = _skewed_streams(6)
    streams[4] = _shift_boundary(streams[4], 3)
    message = "block 2: bitstream does not decode to its recorded length"
    with pytest.raises(HuffmanError, match=f"^{message}$"):
        huffman.decode(*streams[4])
    with pytest.raises(huffman.StreamError, match=f"^stream 4: {message}$") as info:
        huffman.decode_many(streams)
    assert info.value.index == 4 and str(info.value.error) == message


def test_first_failing_stream_is_reported() -> None:
    streams = _skewed_streams(6)
    streams[1] = _shift_boundary(streams[1], 5)
    streams[3] = _shift_boundary(streams[3], 1)
    truncated = (streams[4][0][:-1], *streams[4][1:])
    with pytest.raises(huffman.StreamError, match="^stream 1: block 4: ") as info:
        huffman.decode_many(streams)
    assert info.value.index == 1
    # A check failing before decoding (truncated data) loses to a bad block in an earlier stream,
    with pytest.raises(huffman.StreamError, match="^stream 1: block 0: "):
        huffman.decode_many([*streams[2:4], truncated])
    # and wins over one in a later stream.
    with pytest.raises(huffman.StreamError, match="^stream 0: stream of .* bits does not fill"):
        huffman.decode_many([truncated, *streams[1:4]])


@pytest.mark.parametrize("seed", range(8))
def test_decode_many_fails_like_the_first_failing_decode(seed: int) -> None:
    """Random corruption of some streams: decode_many raises what the first failing decode does."""
    rng = np.random.default_rng(100 + seed)
    streams = [args for _, args in (_random_stream(rng) for _ in range(8))]
    streams.insert(int(rng.integers(0, 9)), _fibonacci_stream()[1])
    for i in rng.choice(len(streams), int(rng.integers(1, 4)), replace=False):
        data, lengths, n, offsets, block_size = streams[i]
        if not data:
            continue
        raw = bytearray(data)
        for pos in rng.integers(0, 8 * len(raw), int(rng.integers(1, 4))):
            raw[pos // 8] ^= 1 << (pos % 8)
        streams[i] = (bytes(raw), lengths, n, offsets, block_size)
    expected = None
    for i, args in enumerate(streams):
        try:
            huffman.decode(*args)
        except HuffmanError as exc:
            expected = (i, str(exc))
            break
    if expected is None:
        out = huffman.decode_many(streams)
        for args, got in zip(streams, out, strict=True):
            np.testing.assert_array_equal(got, huffman.decode(*args))
        return
    with pytest.raises(huffman.StreamError) as info:
        huffman.decode_many(streams)
    assert (info.value.index, str(info.value.error)) == expected
