"""Length-limited canonical Huffman coding with block-parallel numpy decoding.

Bitstream convention (specified in docs/format.md): codes are canonical (DEFLATE
order: shorter codes first, ties by symbol value) and written LSB-first, i.e. the
first bit of a code goes to the lowest unused bit of the current byte. Symbols are
split into blocks of ``block_size`` symbols; each block starts at a recorded bit
offset so that every block can be decoded on its own. Decoding advances one cursor
per block in lock step, so each numpy call processes one symbol of *every* block;
:func:`decode_many` does so for the blocks of many streams at once.

One concern per module. Each imports only the modules above it (named in brackets), so
there are no cycles::

    limits   MAX_CODE_LEN, MAX_ALPHABET, block sizes, HuffmanError, check_block_size
    codes    code_lengths (Huffman, package-merge), validate_lengths,      [limits]
             canonical_codes, first_codes, reverse_bits, entropy_bits, coded_bits
    encoder  choose_block_size, encode (LSB-first packing)                 [limits, codes]
    decoder  decode, decode_many, StreamError, lookup tables, lock-step    [limits, codes]
             kernel, long-code resolver

The modules are named ``encoder``/``decoder`` so that they do not shadow the functions
:func:`encode` and :func:`decode` re-exported here. This package offers the names the
single ``huffman`` module did; the private ``_huffman_depths`` and ``_package_merge`` are
re-exported for the tests. The decoder's tunables (``_SHARED_TABLE_MAX``, ``_lock_step``)
are not: they are read in :mod:`.decoder`, so that is where they must be replaced.
"""

from __future__ import annotations

from .codes import _huffman_depths as _huffman_depths
from .codes import _package_merge as _package_merge
from .codes import (
    canonical_codes,
    code_lengths,
    coded_bits,
    entropy_bits,
    reverse_bits,
    validate_lengths,
)
from .decoder import StreamError, decode, decode_many
from .encoder import choose_block_size, encode
from .limits import (
    DEFAULT_BLOCK_SIZE,
    MAX_ALPHABET,
    MAX_BLOCK_SIZE,
    MAX_CODE_LEN,
    MIN_BLOCK_SIZE,
    HuffmanError,
)

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAX_ALPHABET",
    "MAX_BLOCK_SIZE",
    "MAX_CODE_LEN",
    "MIN_BLOCK_SIZE",
    "HuffmanError",
    "StreamError",
    "canonical_codes",
    "choose_block_size",
    "code_lengths",
    "coded_bits",
    "decode",
    "decode_many",
    "encode",
    "entropy_bits",
    "reverse_bits",
    "validate_lengths",
]
