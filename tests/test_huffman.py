"""Canonical Huffman coding: optimality, length limits, canonical codes, bit-exact round trips."""

from __future__ import annotations

import numpy as np
import pytest

from compresspipe.coding import huffman
from compresspipe.coding.huffman import HuffmanError

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
