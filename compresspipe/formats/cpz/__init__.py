"""The ``.cpz`` container: Deep Compression's entropy-coded stage as a file format.

A ``.cpz`` file holds named tensors, each as sparse positions plus cluster indices,
int8 codes or raw floats, every integer stream Huffman-coded with its own canonical
code, and an opaque JSON metadata dict. The byte layout is specified in docs/format.md.
Everything here is numpy + stdlib; the reader treats its input as hostile and raises
only :class:`CpzFormatError`.

One concern per module. Each imports only modules listed above it (named in brackets,
besides :mod:`compresspipe.formats.huffman`), so there are no cycles::

    container  magic, versions, header/section structs, limits, dtypes,
               CpzFormatError, the tensor-name rule
    streams    HuffmanStream, one Huffman-coded integer stream     [container]
    positions  sparse positions: relidx, runs, bitmap              [container, streams]
    encode     tensor records, TensorEncoding, encode_*            [container, streams, positions]
    specs      Entry and the stream/array/blob specs, check_stream [container]
    table      version 2: binary section table, compressed blocks  [container, encode, specs,
                                                                    streams]
    write      pack_cpz, write_cpz                                 [container, streams, encode,
                                                                    table]
    parse      header, digest, sections, section-table checks      [container, specs, table]
    decode     unpack_cpz, read_cpz                                [container, streams,
                                                                    positions, encode, specs,
                                                                    parse]
    inspect    inspect_cpz, byte_parts, coding_summary,            [container, specs, parse,
               container_parts                                      decode]

This package offers the names the single ``cpz`` module did, including the private
``_HEADER``, ``_SECTION``, ``_DIGEST_SIZE``, ``_escape``, ``_gaps`` and ``_unescape`` that
tests and benchmarks use.
"""

from __future__ import annotations

from .container import (
    DEFAULT_MAX_ELEMENTS,
    DIGEST_SIZE,
    HEADER,
    JSON_VERSION,
    MAGIC,
    MAX_CODEBOOK,
    MAX_ESCAPE_BITS,
    MAX_NAME_LEN,
    MAX_NDIM,
    MAX_PAIR_ALPHABET,
    SECTION,
    VERSION,
    WRITE_MAX_CODE_LEN,
    CpzFormatError,
)
from .decode import read_cpz, unpack_cpz
from .encode import (
    ClusteredTensor,
    CpzTensor,
    Int8Tensor,
    RawTensor,
    TensorEncoding,
    encode_clustered,
    encode_int8,
    encode_raw,
    encode_tensor,
)
from .inspect import byte_parts, coding_summary, container_parts, inspect_cpz
from .positions import (
    PositionsEncoding,
    decode_positions,
    encode_positions,
    escape,
    gaps,
    position_costs,
    unescape,
)
from .streams import HuffmanStream
from .write import pack_cpz, write_cpz

# Private names of the single module this package replaces, still used by tests and benchmarks.
_HEADER, _SECTION, _DIGEST_SIZE = HEADER, SECTION, DIGEST_SIZE
_escape, _gaps, _unescape = escape, gaps, unescape

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "JSON_VERSION",
    "MAGIC",
    "MAX_CODEBOOK",
    "MAX_ESCAPE_BITS",
    "MAX_NAME_LEN",
    "MAX_NDIM",
    "MAX_PAIR_ALPHABET",
    "VERSION",
    "WRITE_MAX_CODE_LEN",
    "ClusteredTensor",
    "CpzFormatError",
    "CpzTensor",
    "HuffmanStream",
    "Int8Tensor",
    "PositionsEncoding",
    "RawTensor",
    "TensorEncoding",
    "byte_parts",
    "coding_summary",
    "container_parts",
    "decode_positions",
    "encode_clustered",
    "encode_int8",
    "encode_positions",
    "encode_raw",
    "encode_tensor",
    "inspect_cpz",
    "pack_cpz",
    "position_costs",
    "read_cpz",
    "unpack_cpz",
    "write_cpz",
]
