"""How a model's 1-D float tensors (BatchNorm scales and shifts, biases) are stored in a .cpz.

Raw float32 vectors were 6% of the quickstart's file. Each can instead be stored as float16 or as
indices into a small per-tensor codebook (1-D k-means, Huffman-coded like any clustered weight);
which one is decided by whoever can evaluate the decoded model (the ``huffman`` stage keeps a
coarser choice only when the model's accuracy on its validation data does not change). numpy
only: :func:`vector_options` gives every candidate's decoded values and encoding.
"""

from __future__ import annotations

import numpy as np

from .cpz import TensorEncoding, encode_clustered, encode_raw

LOSSLESS = "fp32"
FP16 = "fp16"
CODEBOOK_BITS = (4, 5, 6, 8)
LEVELS = tuple(f"cb{b}" for b in CODEBOOK_BITS) + (FP16,)  # coarsest first
LABELS = {LOSSLESS: "raw float32", FP16: "vector float16",
          **{f"cb{b}": f"vector codebook {b}-bit" for b in CODEBOOK_BITS}}


def is_vector(array: np.ndarray) -> bool:
    """A float32 tensor of at most one dimension with more than one element."""
    return array.dtype == np.float32 and array.ndim <= 1 and array.size > 1


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """(codebook float32, indices uint8/uint16): Lloyd's algorithm from quantile centroids,
    deterministic; empty clusters keep their centroid. Values with at most ``k`` distinct
    entries are their own codebook, so coding a coded vector again changes nothing (the huffman
    stage writes the chosen values into the model, then encodes that model)."""
    distinct, inverse = np.unique(values.astype(np.float32).reshape(-1), return_inverse=True)
    if distinct.size <= k:
        return distinct, inverse.astype(np.uint8 if k <= 256 else np.uint16)
    x = values.astype(np.float64).reshape(-1)
    book = np.unique(np.quantile(x, (np.arange(k) + 0.5) / k))
    for _ in range(iterations):
        edges = (book[1:] + book[:-1]) / 2
        idx = np.searchsorted(edges, x)
        sums = np.bincount(idx, weights=x, minlength=book.size)
        counts = np.bincount(idx, minlength=book.size)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), book)
        if np.array_equal(new, book):
            break
        book = new
    book = book.astype(np.float32)
    edges = (book[1:].astype(np.float64) + book[:-1]) / 2
    idx = np.searchsorted(edges, x)
    return book, idx.astype(np.uint8 if book.size <= 256 else np.uint16)


def encode_vector(array: np.ndarray, how: str) -> tuple[np.ndarray, TensorEncoding]:
    """(the values a reader decodes, the encoding) of a 1-D float32 tensor stored as ``how``
    (``fp32``, ``fp16`` or ``cbN``)."""
    if how == LOSSLESS:
        return array, encode_raw(array)
    if how == FP16:
        half = array.astype(np.float16)
        return half.astype(np.float32), encode_raw(half)
    bits = int(how.removeprefix("cb"))
    if how not in LEVELS or array.size <= 1 << bits:
        raise ValueError(f"no vector coding {how!r} for {array.size} values")
    book, idx = kmeans_1d(array, 1 << bits)
    return book[idx].reshape(array.shape), encode_clustered(idx.reshape(array.shape), book,
                                                            zero_index=None)


def vector_options(array: np.ndarray) -> dict[str, tuple[np.ndarray, TensorEncoding]]:
    """Every coding of a vector smaller than float16 at its level or finer, keyed by level:
    for each level, the level's own coding when it is smaller in bytes than float16, else
    float16; and ``fp32``."""
    half = encode_vector(array, FP16)
    out = {LOSSLESS: encode_vector(array, LOSSLESS), FP16: half}
    for level in LEVELS[:-1]:
        bits = int(level.removeprefix("cb"))
        if array.size > 1 << bits:
            option = encode_vector(array, level)
            if option[1].nbytes < half[1].nbytes:
                out[level] = option
    return out


def assignment(options: dict[str, dict[str, tuple[np.ndarray, TensorEncoding]]],
               level: str) -> dict[str, str]:
    """Per tensor, the coarsest coding at ``level`` or finer (fp16 when no codebook of that
    precision pays for a tensor)."""
    finer = LEVELS[LEVELS.index(level):]
    return {name: next(lv for lv in finer if lv in opts) for name, opts in options.items()}
