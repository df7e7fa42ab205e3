"""Entropy coding of compressed tensors (Deep Compression's third stage) and the .cpz container.

Pure numpy + stdlib: nothing here knows about torch or training.
"""

from __future__ import annotations

from .cpz import (
    ClusteredTensor,
    CpzFormatError,
    CpzTensor,
    HuffmanStream,
    Int8Tensor,
    PositionsEncoding,
    RawTensor,
    TensorEncoding,
    coding_summary,
    decode_positions,
    encode_clustered,
    encode_int8,
    encode_positions,
    encode_raw,
    encode_tensor,
    inspect_cpz,
    pack_cpz,
    position_costs,
    read_cpz,
    unpack_cpz,
    write_cpz,
)
from .huffman import HuffmanError

__all__ = [
    "coding_summary",
    "ClusteredTensor",
    "CpzFormatError",
    "CpzTensor",
    "HuffmanError",
    "HuffmanStream",
    "Int8Tensor",
    "PositionsEncoding",
    "RawTensor",
    "TensorEncoding",
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
