"""The Huffman format's limits, its error type, and the block-size check.

The limits bound what a ``.cpz`` stream may declare (code length, alphabet, block size);
:func:`check_block_size` is the one check that both :mod:`.encoder` and :mod:`.decoder`
apply before anything else. This module imports nothing from the package.
"""

from __future__ import annotations

MAX_CODE_LEN = 24
"""Longest code the format allows; a 24-bit peek plus a 7-bit byte offset fits a uint32."""
MAX_ALPHABET = 1 << 24
MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 1 << 16
DEFAULT_BLOCK_SIZE = 4096


class HuffmanError(ValueError):
    """Invalid code lengths, symbols or bitstream."""


def check_block_size(block_size: int) -> None:
    """Raise HuffmanError unless ``block_size`` is a power of two in [MIN, MAX]_BLOCK_SIZE."""
    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise HuffmanError(
            f"block size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], got {block_size}"
        )
