"""The tensor records of a ``.cpz`` file and their encoders.

The decoded tensors a reader returns (:class:`ClusteredTensor`, :class:`Int8Tensor`,
:class:`RawTensor`, together :data:`CpzTensor`), :class:`TensorEncoding` (a tensor coded and
ready to be written) and the encoders that build one: :func:`encode_clustered`,
:func:`encode_int8`, :func:`encode_raw` and :func:`encode_tensor`, which store the values
densely or as positions plus the nonzero values, whichever is smaller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np

from .container import DTYPES, FLOAT_DTYPES, INT_DTYPES, MAX_CODEBOOK, MAX_NDIM
from .positions import PositionsEncoding, encode_positions
from .streams import HuffmanStream, stream_choice

# --------------------------------------------------------------------------- decoded tensors


@dataclass(frozen=True, eq=False)
class ClusteredTensor:
    """Cluster indices into a float32 codebook; ``zero_index`` marks pruned entries."""

    indices: np.ndarray
    codebook: np.ndarray
    zero_index: int | None = 0

    def to_dense(self) -> np.ndarray:
        """The float32 weight ``codebook[indices]`` (zeros where indices == zero_index)."""
        return self.codebook[self.indices]


@dataclass(frozen=True, eq=False)
class Int8Tensor:
    """Affine int8 codes: ``(q - zero_point) * scale``, per tensor (axis None) or per ``axis``."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None = None

    def to_dense(self) -> np.ndarray:
        """The dequantized float32 weight."""
        shape = [1] * self.q.ndim
        if self.axis is not None:
            shape[self.axis] = -1
        scale = np.asarray(self.scale, dtype=np.float32).reshape(shape)
        zp = np.asarray(self.zero_point, dtype=np.float32).reshape(shape)
        return ((self.q.astype(np.float32) - zp) * scale).astype(np.float32, copy=False)


@dataclass(frozen=True, eq=False)
class RawTensor:
    """A tensor stored as-is (biases, norms, anything small)."""

    array: np.ndarray

    def to_dense(self) -> np.ndarray:
        """The array as float32."""
        return self.array.astype(np.float32)


CpzTensor = Union[ClusteredTensor, Int8Tensor, RawTensor]  # noqa: UP007 - a runtime alias


@dataclass(frozen=True, eq=False)
class TensorEncoding:
    """A tensor ready to be written: coded streams plus the raw side arrays."""

    kind: str  # "clustered" | "int8" | "raw"
    shape: tuple[int, ...]
    dtype: str
    values: HuffmanStream | np.ndarray  # ndarray only for kind "raw"
    positions: PositionsEncoding | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # codebook / scale / zero_point
    zero_index: int | None = None
    axis: int | None = None

    @property
    def nbytes(self) -> int:
        """Payload bytes this tensor will occupy in the file (excluding its table entry)."""
        values = (
            self.values.nbytes if isinstance(self.values, HuffmanStream) else self.values.nbytes
        )
        positions = self.positions.nbytes if self.positions is not None else 0
        return values + positions + sum(a.nbytes for a in self.arrays.values())


# --------------------------------------------------------------------------- building encodings


def encode_clustered(
    indices: np.ndarray,
    codebook: np.ndarray,
    shape: tuple[int, ...] | None = None,
    zero_index: int | None = 0,
) -> TensorEncoding:
    """Encode cluster indices (any integer dtype, values in [0, len(codebook))).

    Entries equal to ``zero_index`` (whose centroid must be exactly 0) are pruned and
    stored as positions when that is smaller than coding them densely; pass None to
    always code densely. ``shape`` reshapes flat indices. The codebook is stored as float32.
    """
    idx = np.asarray(indices)
    if shape is not None:
        idx = idx.reshape(tuple(shape))
    if not np.issubdtype(idx.dtype, np.integer) or idx.dtype.name not in INT_DTYPES:
        raise TypeError(f"indices must have an integer dtype, got {idx.dtype}")
    book = np.ascontiguousarray(codebook, dtype=np.float32).reshape(-1)
    k = book.size
    if not 1 <= k <= MAX_CODEBOOK:
        raise ValueError(f"codebook must have 1..{MAX_CODEBOOK} entries, got {k}")
    if np.iinfo(idx.dtype).max < k - 1:
        raise ValueError(f"dtype {idx.dtype} cannot hold cluster index {k - 1}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= k):
        raise ValueError(f"cluster indices must lie in [0, {k})")
    if zero_index is not None:
        if not 0 <= zero_index < k:
            raise ValueError(f"zero_index {zero_index} outside the codebook")
        if book[zero_index] != 0:
            raise ValueError(f"codebook[{zero_index}] is {book[zero_index]}, not 0")
    flat = idx.reshape(-1)
    positions, values = _choose_sparse(flat, k, None if zero_index is None else flat != zero_index)
    return TensorEncoding(
        "clustered",
        tuple(int(d) for d in idx.shape),
        idx.dtype.name,
        values,
        positions,
        {"codebook": book},
        zero_index=zero_index,
    )


def encode_int8(
    q: np.ndarray,
    scale: np.ndarray | float,
    zero_point: np.ndarray | int = 0,
    axis: int | None = None,
) -> TensorEncoding:
    """Encode int8 codes with per-tensor (axis None) or per-``axis`` scale/zero point.

    ``scale`` (float16/32/64) and ``zero_point`` (any integer dtype) are stored raw with
    their dtype and shape; entries equal to their zero point are treated as pruned.
    """
    q = np.asarray(q)
    if q.dtype != np.int8:
        raise TypeError(f"q must be int8, got {q.dtype}")
    scale_arr = np.asarray(scale)
    if scale_arr.dtype.name not in FLOAT_DTYPES:
        scale_arr = scale_arr.astype(np.float32)
    zp_arr = np.asarray(zero_point)
    if zp_arr.dtype.name not in INT_DTYPES:
        raise TypeError(f"zero_point must have an integer dtype, got {zp_arr.dtype}")
    axis = _normalize_axis(axis, q.ndim)
    channels = 1 if axis is None else q.shape[axis]
    for name, arr in (("scale", scale_arr), ("zero_point", zp_arr)):
        if arr.size != channels or arr.ndim > MAX_NDIM:
            raise ValueError(f"{name} has {arr.size} entries; axis {axis} needs {channels}")
    flat = q.reshape(-1)
    zero = broadcast_channel(zp_arr, q.shape, axis).reshape(-1)
    positions, values = _choose_sparse(flat.view(np.uint8) ^ np.uint8(0x80), 256, flat != zero)
    return TensorEncoding(
        "int8",
        tuple(int(d) for d in q.shape),
        "int8",
        values,
        positions,
        {"scale": np.ascontiguousarray(scale_arr), "zero_point": np.ascontiguousarray(zp_arr)},
        axis=axis,
    )


def encode_raw(arr: np.ndarray) -> TensorEncoding:
    """Store an array verbatim (little-endian), e.g. float16/float32 biases and norms."""
    a = np.asarray(arr)
    if a.dtype.name not in DTYPES:
        raise TypeError(f"unsupported dtype {a.dtype}; use one of {sorted(DTYPES)}")
    return TensorEncoding(
        "raw", tuple(int(d) for d in a.shape), a.dtype.name, np.ascontiguousarray(a)
    )


def encode_tensor(tensor: CpzTensor) -> TensorEncoding:
    """Encode a decoded tensor (as returned by :func:`read_cpz`) again."""
    if isinstance(tensor, ClusteredTensor):
        return encode_clustered(tensor.indices, tensor.codebook, zero_index=tensor.zero_index)
    if isinstance(tensor, Int8Tensor):
        return encode_int8(tensor.q, tensor.scale, tensor.zero_point, tensor.axis)
    if isinstance(tensor, RawTensor):
        return encode_raw(tensor.array)
    raise TypeError(f"cannot encode {type(tensor).__name__}")


def _choose_sparse(
    symbols: np.ndarray, alphabet: int, mask: np.ndarray | None
) -> tuple[PositionsEncoding | None, HuffmanStream]:
    """Dense values, or positions + nonzero values, whichever is smaller."""
    dense_cost, dense_group = stream_choice(symbols, alphabet)
    if mask is not None and symbols.size:
        kept = symbols[mask]
        positions = encode_positions(mask)
        kept_cost, kept_group = stream_choice(kept, alphabet)
        if positions.nbytes + kept_cost < dense_cost:
            return positions, HuffmanStream.from_symbols(kept, alphabet, kept_group)
    return None, HuffmanStream.from_symbols(symbols, alphabet, dense_group)


def _normalize_axis(axis: int | None, ndim: int) -> int | None:
    if axis is None:
        return None
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for {ndim} dimensions")
    return axis % ndim


def broadcast_channel(values: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    view = [1] * len(shape)
    if axis is not None:
        view[axis] = -1
    return np.broadcast_to(values.reshape(view), shape)
