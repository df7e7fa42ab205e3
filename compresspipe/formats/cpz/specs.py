"""What a parsed ``.cpz`` section table describes, whatever its version.

:class:`Entry` (one tensor) with its :class:`ArraySpec`, :class:`StreamSpec`,
:class:`PositionsSpec` and :class:`Blob` references into the payload; :func:`check_stream`,
the limits every Huffman stream descriptor must meet; :func:`section` and :func:`fail`, which
turn every problem into a :class:`CpzFormatError` naming the section at fault.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .. import huffman
from .container import MAX_PAIR_ALPHABET, CpzFormatError


@contextmanager
def section(where: str) -> Iterator[None]:
    """Re-raise anything that goes wrong while reading ``where`` as a CpzFormatError naming it."""
    try:
        yield
    except CpzFormatError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError) as exc:
        raise CpzFormatError(f"{where}: {exc}") from exc


def fail(where: str, message: str) -> CpzFormatError:
    return CpzFormatError(f"{where}: {message}")


@dataclass(frozen=True)
class Blob:
    """A byte range of the payload; ``crc32`` is None in version 2, whose file digest covers it."""

    offset: int
    length: int
    crc32: int | None


@dataclass(frozen=True)
class ArraySpec:
    dtype: np.dtype
    shape: tuple[int, ...]
    blob: Blob


@dataclass(frozen=True)
class StreamSpec:
    count: int
    alphabet: int
    group: int
    block_size: int
    width: int
    blob: Blob

    @property
    def coded(self) -> int:
        """Huffman codes in the bitstream."""
        return -(-self.count // self.group)

    @property
    def n_blocks(self) -> int:
        return -(-self.coded // self.block_size)

    @property
    def table_bytes(self) -> int:
        return self.alphabet**self.group + self.n_blocks * self.width


@dataclass(frozen=True)
class PositionsSpec:
    method: str
    count: int
    bits: int
    stream: StreamSpec | None
    blob: Blob | None


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: np.dtype
    size: int
    zero_index: int | None
    axis: int | None
    arrays: dict[str, ArraySpec]
    positions: PositionsSpec | None
    values: StreamSpec | Blob

    def blobs(self) -> list[Blob]:
        out = [a.blob for a in self.arrays.values()]
        if self.positions is not None:
            out.append(
                self.positions.blob if self.positions.stream is None else self.positions.stream.blob
            )
        out.append(self.values if isinstance(self.values, Blob) else self.values.blob)
        return out


def check_stream(spec: StreamSpec, alphabet: int | None, where: str) -> StreamSpec:
    """The limits of docs/format.md section 4 on one stream descriptor (both versions)."""
    # Every code is at least one bit, which bounds the decoded size by the blob size.
    if not 0 <= spec.count <= 8 * spec.group * spec.blob.length:
        raise fail(f"{where}: count", f"{spec.count} symbols cannot fit {spec.blob.length} bytes")
    if not 1 <= spec.alphabet <= huffman.MAX_ALPHABET:
        raise fail(f"{where}: alphabet", f"must lie in [1, {huffman.MAX_ALPHABET}]")
    if not (huffman.MIN_BLOCK_SIZE <= spec.block_size <= huffman.MAX_BLOCK_SIZE
            and spec.width in (2, 4) and not spec.block_size & (spec.block_size - 1)):
        raise fail(where, "block size must be a power of two in "
                   f"[{huffman.MIN_BLOCK_SIZE}, {huffman.MAX_BLOCK_SIZE}] and width 2 or 4")
    if alphabet is not None and spec.alphabet != alphabet:
        raise fail(where, f"alphabet {spec.alphabet}, expected {alphabet}")
    if spec.group == 2 and spec.alphabet**2 > MAX_PAIR_ALPHABET:
        raise fail(where, f"pairs of a {spec.alphabet}-symbol alphabet exceed {MAX_PAIR_ALPHABET}")
    if spec.blob.length < spec.table_bytes:
        raise fail(where, f"{spec.blob.length} bytes cannot hold the code and block tables")
    return spec
