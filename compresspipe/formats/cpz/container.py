"""The fixed parts of the ``.cpz`` container, shared by its writer and its reader.

Holds the magic and the versions (1: JSON section table; 2: binary section table, compressed
metadata), the byte structs of the header and of each section, the size of the blake2b digest
trailer (docs/format.md), the dtype and block codes of the binary table, the limits on code lengths, ranks,
codebooks, names, escape widths, pair alphabets and decoded elements, the dtypes a file may
store, the position methods, :class:`CpzFormatError` and the rule for tensor names
(:func:`name_problem`).
"""

from __future__ import annotations

import struct

import numpy as np

MAGIC = b"CPZ\x00"
VERSION = 2  # what writers write
JSON_VERSION = 1  # the JSON section table: still read, written only on request
VERSIONS = (JSON_VERSION, VERSION)
HEADER = struct.Struct("<4sHHQ")  # magic, version, flags, file length
SECTION = struct.Struct("<II")  # length, crc32 of the metadata or the section-table block
DIGEST_SIZE = 32  # blake2b-256 trailer
MIN_FILE = HEADER.size + 2 * SECTION.size + DIGEST_SIZE

WRITE_MAX_CODE_LEN = 16
"""Writers limit codes to 16 bits so the decoder's 2**16-entry table always resolves a code."""
MAX_NDIM = 32
MAX_CODEBOOK = 1 << 16
MAX_NAME_LEN = 1024
MAX_ESCAPE_BITS = 16
MAX_PAIR_ALPHABET = 1 << 16
DEFAULT_MAX_ELEMENTS = 1 << 32
"""Default cap on the total elements a reader will materialize (sparse tensors decode to
far more bytes than they occupy, so the file size alone cannot bound them)."""

DTYPES = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    )
}
DTYPE_CODES = tuple(DTYPES)  # version 2 stores a dtype as its index in this tuple
INT_DTYPES = {k for k, v in DTYPES.items() if v.kind in "iu"}
FLOAT_DTYPES = {k for k, v in DTYPES.items() if v.kind == "f"}
POSITION_METHODS = ("relidx", "runs", "bitmap")
KINDS = ("clustered", "int8", "raw")  # version 2 stores a kind as its index
BLOCK_CODECS = ("raw", "zlib", "lzma")  # version 2: the first byte of each section block


class CpzFormatError(ValueError):
    """A .cpz file is truncated, corrupt, of another version or otherwise malformed.

    The message starts with the section at fault, e.g.
    ``tensor 'fc.weight': values stream: checksum mismatch``.
    """


def name_problem(name: object) -> str | None:
    """Why ``name`` is not an acceptable tensor name (None if it is)."""
    if not isinstance(name, str):
        return "not a string"
    if not 1 <= len(name) <= MAX_NAME_LEN:
        return f"length must be 1..{MAX_NAME_LEN}"
    # Names may become file names or keys downstream; refuse anything path-like or invisible.
    if not name.isprintable() or "/" in name or "\\" in name or name.startswith("."):
        return "must be printable, contain no '/' or '\\' and not start with '.'"
    return None
