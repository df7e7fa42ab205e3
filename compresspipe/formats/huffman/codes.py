"""Code construction: optimal length-limited code lengths and the canonical codes they define.

:func:`code_lengths` builds lengths from symbol counts (Huffman, falling back to
package-merge when a code would exceed the limit); :func:`validate_lengths` checks
untrusted lengths; :func:`canonical_codes` and :func:`first_codes` turn lengths into
DEFLATE-order canonical codes; :func:`reverse_bits` flips codes for the LSB-first
bitstream. :func:`entropy_bits` and :func:`coded_bits` size a stream without coding it.
Imports only :mod:`.limits`.
"""

from __future__ import annotations

import heapq

import numpy as np

from .limits import MAX_ALPHABET, MAX_CODE_LEN, HuffmanError


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon bound in bits for coding a stream with these symbol counts (order-0)."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    total = c.sum()
    return float(np.sum(c * np.log2(total / c)))


def coded_bits(counts: np.ndarray, lengths: np.ndarray) -> int:
    """Exact size in bits of a stream with these counts coded with these code lengths."""
    c = np.asarray(counts, dtype=np.int64)
    n = np.asarray(lengths, dtype=np.int64)
    if np.any(c[n == 0] > 0):
        raise HuffmanError("a symbol with a nonzero count has no code")
    return int(np.dot(c, n))


def code_lengths(counts: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Optimal prefix-code lengths (uint8) for these frequencies, no code longer than max_len.

    Zero-count symbols get length 0; a lone used symbol gets length 1. Unconstrained
    Huffman is tried first; if it exceeds max_len, package-merge gives the optimal
    length-limited code instead.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
        raise HuffmanError("counts must be a 1-D integer array")
    if counts.size > MAX_ALPHABET:
        raise HuffmanError(f"alphabet of {counts.size} symbols exceeds {MAX_ALPHABET}")
    if counts.size and counts.min() < 0:
        raise HuffmanError("counts must be non-negative")
    if not 1 <= max_len <= MAX_CODE_LEN:
        raise HuffmanError(f"max_len must be in [1, {MAX_CODE_LEN}], got {max_len}")
    lengths = np.zeros(counts.size, dtype=np.uint8)
    used = np.flatnonzero(counts)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used] = 1
        return lengths
    if used.size > (1 << max_len):
        raise HuffmanError(f"{used.size} symbols cannot be coded in at most {max_len} bits")
    weights = counts[used].astype(np.int64)
    depths = _huffman_depths(weights)
    if depths.max() > max_len:
        order = np.argsort(weights, kind="stable")
        depths = np.empty(used.size, dtype=np.int64)
        depths[order] = _package_merge(weights[order], max_len)
    lengths[used] = depths
    return lengths


def _huffman_depths(weights: np.ndarray) -> np.ndarray:
    """Leaf depths of a Huffman tree; ties broken by node id so the result is deterministic."""
    m = weights.size
    heap = list(zip(weights.tolist(), range(m), strict=True))
    heapq.heapify(heap)
    parent = [0] * (2 * m - 1)
    next_id = m
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = next_id
        heapq.heappush(heap, (w1 + w2, next_id))
        next_id += 1
    depth = [0] * (2 * m - 1)
    # Parents always have larger ids than their children, so one descending pass suffices.
    for node in range(2 * m - 3, -1, -1):
        depth[node] = depth[parent[node]] + 1
    return np.asarray(depth[:m], dtype=np.int64)


def _package_merge(weights: np.ndarray, max_len: int) -> np.ndarray:
    """Optimal length-limited code lengths for ascending ``weights`` (Larmore-Hirschberg).

    Each level's list is the leaves merged with pairwise packages of the level below.
    Because leaves stay in ascending order inside every list, the leaves selected at a
    level are always a prefix of the sorted leaves, so only their count is tracked.
    """
    n = weights.size
    leaf_flags = []
    cur = weights
    is_leaf = np.ones(n, dtype=bool)
    leaf_flags.append(is_leaf)
    for _ in range(max_len - 1):
        packages = cur[: cur.size // 2 * 2].reshape(-1, 2).sum(axis=1)
        merged = np.concatenate([weights, packages])
        flags = np.concatenate([np.ones(n, dtype=bool), np.zeros(packages.size, dtype=bool)])
        order = np.argsort(merged, kind="stable")  # stable: leaves win ties, like the classic merge
        cur = merged[order]
        leaf_flags.append(flags[order])
    lengths = np.zeros(n, dtype=np.int64)
    take = 2 * n - 2
    for flags in reversed(leaf_flags):
        leaves = int(np.count_nonzero(flags[:take]))
        lengths[:leaves] += 1
        take = 2 * (take - leaves)
    return lengths


def validate_lengths(lengths: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Check that lengths describe a prefix code (each in [0, max_len], Kraft sum <= 1).

    Returns the lengths as a uint8 array; raises HuffmanError otherwise.
    """
    arr = np.asarray(lengths)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise HuffmanError("code lengths must be a 1-D integer array")
    if arr.size > MAX_ALPHABET:
        raise HuffmanError(f"alphabet of {arr.size} symbols exceeds {MAX_ALPHABET}")
    if arr.size and (arr.min() < 0 or arr.max() > max_len):
        raise HuffmanError(f"code lengths must lie in [0, {max_len}]")
    arr = arr.astype(np.uint8)
    used = arr[arr > 0].astype(np.int64)
    kraft = int(np.sum(np.left_shift(1, MAX_CODE_LEN - used, dtype=np.int64)))
    if kraft > (1 << MAX_CODE_LEN):
        raise HuffmanError(
            f"code lengths are not a prefix code (Kraft sum {kraft / (1 << MAX_CODE_LEN):.6g} > 1)"
        )
    return arr


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code values (uint32, MSB = first bit) from code lengths alone.

    Codes are assigned in order of (length, symbol), as in DEFLATE (RFC 1951 3.2.2);
    symbols with length 0 get code 0 and are never emitted.
    """
    lens = validate_lengths(lengths).astype(np.int64)
    codes = np.zeros(lens.size, dtype=np.uint32)
    if lens.size == 0 or lens.max() == 0:
        return codes
    first = first_codes(lens)
    order = np.lexsort((np.arange(lens.size), lens))
    order = order[lens[order] > 0]
    sorted_lens = lens[order]
    group_start = np.searchsorted(sorted_lens, sorted_lens, side="left")
    rank = np.arange(order.size) - group_start
    codes[order] = (first[sorted_lens] + rank).astype(np.uint32)
    return codes


def first_codes(lens: np.ndarray) -> np.ndarray:
    """first[l] = canonical code of the first symbol of length l (index 0..max)."""
    max_len = int(lens.max())
    bl_count = np.bincount(lens, minlength=max_len + 1)
    bl_count[0] = 0
    first = np.zeros(max_len + 1, dtype=np.int64)
    code = 0
    for bits in range(1, max_len + 1):  # loop over code lengths, at most 24
        code = (code + int(bl_count[bits - 1])) << 1
        first[bits] = code
    return first


def reverse_bits(values: np.ndarray, widths: np.ndarray | int) -> np.ndarray:
    """Reverse the low ``widths`` bits of each value (uint64 result)."""
    v = np.asarray(values, dtype=np.uint64)
    w = np.broadcast_to(np.asarray(widths, dtype=np.int64), v.shape)
    out = np.zeros(v.shape, dtype=np.uint64)
    for i in range(int(w.max(initial=0))):  # loop over bit positions, at most 24
        bit = (v >> np.uint64(i)) & np.uint64(1)
        dest = np.maximum(w - 1 - i, 0).astype(np.uint64)
        out |= np.where(w > i, bit << dest, np.uint64(0))
    return out
