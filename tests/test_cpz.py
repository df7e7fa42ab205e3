""".cpz container: bit-exact round trips, sparse-format choice, and a reader that survives hostile files."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compresspipe.formats import (
    ClusteredTensor,
    CpzFormatError,
    Int8Tensor,
    RawTensor,
    cpz,
    decode_positions,
    encode_clustered,
    encode_int8,
    encode_positions,
    encode_raw,
    encode_tensor,
    huffman,
    inspect_cpz,
    pack_cpz,
    position_costs,
    read_cpz,
    unpack_cpz,
    write_cpz,
)

RNG_SEED = 20240601


def _pruned_clustered(rng: np.random.Generator, shape: tuple[int, ...], density: float) -> tuple:
    """Cluster indices of a magnitude-pruned Gaussian weight, with codebook[0] == 0."""
    w = rng.normal(size=shape).astype(np.float32)
    keep = np.abs(w) >= np.quantile(np.abs(w), 1 - density) if w.size else np.zeros(shape, bool)
    centroids = np.linspace(-2.5, 2.5, 15, dtype=np.float32)
    book = np.concatenate([[0.0], centroids]).astype(np.float32)
    idx = np.zeros(shape, dtype=np.uint8)
    idx[keep] = 1 + np.abs(w[keep][:, None] - centroids[None, :]).argmin(axis=1)
    return idx, book


def _sample_tensors(rng: np.random.Generator, scale: int = 1) -> dict[str, cpz.TensorEncoding]:
    idx, book = _pruned_clustered(rng, (8 * scale, 4, 3, 3), 0.1)
    q = rng.integers(-20, 20, size=(6, 5 * scale), dtype=np.int8)
    q[:, ::2] = 1
    return {
        "layer1.0.conv1.weight": encode_clustered(idx, book),
        "fc.weight": encode_int8(q, rng.random(6).astype(np.float32), np.ones(6, np.int8), axis=0),
        "fc.bias": encode_raw(rng.normal(size=6).astype(np.float16)),
    }


@pytest.fixture(scope="module")
def sample_file() -> bytes:
    """A version-1 file (JSON section table): the hostile-file tests below edit its JSON; the
    binary table of version 2 has its own in test_cpz_v2.py."""
    return pack_cpz(
        _sample_tensors(np.random.default_rng(RNG_SEED)), {"arch": "resnet18", "top1": 0.69},
        version=cpz.JSON_VERSION,
    )


def _assert_same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    for field in a.__dataclass_fields__:
        x, y = getattr(a, field), getattr(b, field)
        if isinstance(x, np.ndarray):
            assert x.dtype == np.asarray(y).dtype and x.shape == np.asarray(y).shape, field
            assert x.tobytes() == np.asarray(y).tobytes(), field  # bit-exact, NaN payloads included
        else:
            assert x == y, field


def _round_trip(tensor: Any, name: str = "t") -> Any:
    out, meta = unpack_cpz(pack_cpz({name: encode_tensor(tensor)}, {}))
    assert meta == {}
    _assert_same(out[name], tensor)
    return out[name]


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64, np.uint64])
def test_clustered_round_trip(density: float, dtype: type) -> None:
    rng = np.random.default_rng(int(density * 1000))
    idx, book = _pruned_clustered(rng, (16, 8, 3, 3), density)
    tensor = _round_trip(ClusteredTensor(idx.astype(dtype), book, 0))
    dense = tensor.to_dense()
    assert dense.dtype == np.float32
    expected = np.where(idx == 0, np.float32(0), book[idx])
    assert dense.tobytes() == expected.tobytes()


def test_clustered_without_zero_index_and_structured_indices() -> None:
    idx = (np.arange(4000) // 7 % 5).reshape(40, 100).astype(np.int32)
    book = np.array([-1.5, 0.25, 1.0, 2.0, 9.0], dtype=np.float32)
    _round_trip(ClusteredTensor(idx, book, None))


def test_clustered_with_65536_centroids() -> None:
    rng = np.random.default_rng(3)
    idx = rng.permutation(1 << 16).astype(np.uint16).reshape(256, 256)
    idx[idx < 9000] = 0
    book = np.concatenate([[0], rng.normal(size=(1 << 16) - 1)]).astype(np.float32)
    _round_trip(ClusteredTensor(idx, book, 0))


@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (), (1,), (1, 1, 1)])
def test_degenerate_shapes(shape: tuple[int, ...]) -> None:
    book = np.array([0.0, 1.0], dtype=np.float32)
    _round_trip(ClusteredTensor(np.ones(shape, np.uint8), book, 0))
    _round_trip(ClusteredTensor(np.zeros(shape, np.uint8), book, 0))
    _round_trip(RawTensor(np.full(shape, 2.5, np.float32)))
    q = np.full(shape, 7, np.int8)
    _round_trip(Int8Tensor(q, np.array([0.5], np.float32), np.array([7], np.int32), None))


def test_all_zero_tensor_is_tiny() -> None:
    book = np.array([0.0, 1.0], dtype=np.float32)
    enc = encode_clustered(np.zeros((512, 512), np.uint8), book)
    assert enc.nbytes < 32
    _round_trip(ClusteredTensor(np.zeros((512, 512), np.uint8), book, 0))


def test_single_distinct_nonzero_symbol() -> None:
    idx = np.full((50, 50), 3, dtype=np.uint8)
    idx[::3] = 0
    _round_trip(ClusteredTensor(idx, np.array([0, 1, 2, 3], np.float32), 0))


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_int8_round_trip(axis: int | None) -> None:
    rng = np.random.default_rng(11)
    q = rng.integers(-128, 128, size=(12, 10, 3), dtype=np.int8)
    channels = 1 if axis is None else q.shape[axis]
    zp = rng.integers(-5, 5, channels).astype(np.int32)
    view = [1, 1, 1]
    if axis is not None:
        view[axis] = -1
    q[rng.random(q.shape) < 0.6] = 0
    q = np.where(q == 0, np.broadcast_to(zp.reshape(view), q.shape), q).astype(np.int8)  # pruned
    scale = rng.random(channels).astype(np.float32) + 0.01
    tensor = _round_trip(Int8Tensor(q, scale, zp, None if axis is None else axis % 3))
    dense = tensor.to_dense()
    expected = (q.astype(np.float32) - zp.reshape(view)) * scale.reshape(view)
    assert dense.tobytes() == expected.astype(np.float32).tobytes()
    assert np.count_nonzero(dense) == np.count_nonzero(expected)


def test_int8_keeps_scale_and_zero_point_dtype_and_shape() -> None:
    q = np.arange(-64, 64, dtype=np.int8).reshape(8, 16)
    tensor = Int8Tensor(
        q, np.linspace(0.1, 1, 8).reshape(8, 1).astype(np.float64), np.zeros((8, 1), np.int16), 0
    )
    _round_trip(tensor)


@pytest.mark.parametrize(
    "array",
    [
        np.array([np.nan, -0.0, np.inf, 1e-40], dtype=np.float32),
        np.arange(12, dtype=np.float16).reshape(3, 4),
        np.random.default_rng(0).normal(size=(7, 3)),
        np.array([True, False, True]),
        np.arange(-5, 5, dtype=np.int64),
        np.array([2**64 - 1, 0], dtype=np.uint64),
        np.arange(10, dtype=">f4"),  # big-endian input is stored little-endian
    ],
)
def test_raw_round_trip(array: np.ndarray) -> None:
    out = unpack_cpz(pack_cpz({"x": encode_raw(array)}, {}))[0]["x"]
    assert out.array.dtype == array.dtype.newbyteorder("=")
    assert out.array.tobytes() == array.astype(array.dtype.newbyteorder("=")).tobytes()


def test_metadata_round_trip_and_file_io(tmp_path: Path) -> None:
    meta = {
        "arch": {"name": "resnet18", "widths": [64, 128]},
        "lineage": ["prune", "cluster"],
        "ünï": None,
    }
    tensors = _sample_tensors(np.random.default_rng(1))
    path = tmp_path / "model.cpz"
    size = write_cpz(path, tensors, meta)
    assert size == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["model.cpz"]  # temp file renamed away
    out, got = read_cpz(path)
    assert got == meta
    assert list(out) == list(tensors)


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "model.cpz"
    with pytest.raises(ValueError):
        write_cpz(path, {}, {"loss": float("nan")})  # strict JSON has no NaN
    with pytest.raises(ValueError):
        write_cpz(path, {"../evil": encode_raw(np.zeros(1))}, {})
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "m.cpz"
    write_cpz(path, {"a": encode_raw(np.zeros(3))}, {"v": 1})
    write_cpz(path, {"b": encode_raw(np.ones(3))}, {"v": 2})
    out, meta = read_cpz(path)
    assert meta == {"v": 2} and list(out) == ["b"]


def test_inspect_reports_sizes_and_entropy(sample_file: bytes, tmp_path: Path) -> None:
    path = tmp_path / "m.cpz"
    path.write_bytes(sample_file)
    stats = {s["name"]: s for s in inspect_cpz(path)}
    conv = stats["layer1.0.conv1.weight"]
    assert conv["shape"] == [8, 4, 3, 3] and conv["kind"] == "clustered"
    assert conv["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert (
        conv["total_bytes"] == conv["positions_bytes"] + conv["values_bytes"] + conv["table_bytes"]
    )
    assert conv["bits_per_weight"] == pytest.approx(8 * conv["total_bytes"] / conv["elements"])
    for stream in ("positions", "values"):
        assert conv[f"{stream}_entropy_bits"] <= 8 * conv[f"{stream}_bytes"]
    assert stats["fc.bias"]["values_entropy_bits"] is None
    payload = sum(s["total_bytes"] for s in stats.values())
    assert payload < len(sample_file)


def test_huffman_values_are_close_to_entropy() -> None:
    rng = np.random.default_rng(5)
    idx, book = _pruned_clustered(rng, (256, 256, 3, 3), 0.1)
    [stats] = inspect_cpz(pack_cpz({"w": encode_clustered(idx, book)}, {}))
    for stream in ("positions", "values"):
        assert 8 * stats[f"{stream}_bytes"] <= 1.02 * stats[f"{stream}_entropy_bits"] + 8


@pytest.mark.parametrize("count", [0, 1, 2, 3, 4097, 10_000])
@pytest.mark.parametrize("group", [1, 2])
def test_symbol_pairs_round_trip(count: int, group: int) -> None:
    symbols = np.random.default_rng(count).integers(0, 17, count)
    stream = cpz.HuffmanStream.from_symbols(symbols, 17, group)
    assert stream.lengths.size == 17**group
    np.testing.assert_array_equal(stream.decode(), symbols)


def test_pairs_are_chosen_when_they_pay_off() -> None:
    rng = np.random.default_rng(4)
    p = np.array([0.7, 0.2, 0.05, 0.05])
    assert cpz.HuffmanStream.from_symbols(rng.choice(4, 100_000, p=p), 4).group == 2
    assert cpz.HuffmanStream.from_symbols(rng.choice(4, 100, p=p), 4).group == 1
    assert cpz.HuffmanStream.from_symbols(rng.integers(0, 256, 10_000), 256).group == 1


def _odd_pair_stream(pad: int) -> cpz.HuffmanStream:
    coded = np.array([1 * 3 + 2, 2 * 3 + pad])  # symbols 1, 2, 2 and a pad of ``pad``
    lengths = huffman.code_lengths(np.bincount(coded, minlength=9))
    data, offsets = huffman.encode(coded, lengths, 16)
    return cpz.HuffmanStream(3, 3, 2, lengths, 16, offsets, data)


def test_nonzero_pair_padding_is_rejected() -> None:
    np.testing.assert_array_equal(_odd_pair_stream(0).decode(), [1, 2, 2])
    with pytest.raises(ValueError, match="padding"):
        _odd_pair_stream(1).decode()
    enc = cpz.TensorEncoding(
        "clustered", (3,), "uint8", _odd_pair_stream(1), arrays={"codebook": np.ones(3, np.float32)}
    )
    with pytest.raises(CpzFormatError, match="^tensor 'w': values stream: nonzero padding symbol$"):
        unpack_cpz(pack_cpz({"w": enc}, {}))


# --------------------------------------------------------------------------- sparse positions


def _structured_mask(n: int) -> np.ndarray:
    """Channel-pruning-like: long runs of kept and pruned entries."""
    return (np.arange(n) // 300) % 3 != 0


@pytest.mark.parametrize(
    ("name", "mask", "expected"),
    [
        ("very sparse", np.random.default_rng(0).random(200_000) < 0.01, "relidx"),
        ("half dense", np.random.default_rng(1).random(200_000) < 0.5, "bitmap"),
        ("structured", _structured_mask(200_000), "runs"),
    ],
)
def test_positions_encoder_picks_the_smallest(name: str, mask: np.ndarray, expected: str) -> None:
    actual = {m: encode_positions(mask, m).nbytes for m in ("relidx", "runs", "bitmap")}
    assert position_costs(mask) == actual  # the cost model is exact
    chosen = encode_positions(mask)
    assert chosen.method == expected, (name, actual)
    assert chosen.nbytes == min(actual.values())
    for method in actual:
        enc = encode_positions(mask, method)
        np.testing.assert_array_equal(decode_positions(enc, mask.size), np.flatnonzero(mask))


@pytest.mark.parametrize("method", ["relidx", "runs", "bitmap"])
@pytest.mark.parametrize(
    "mask",
    [
        np.zeros(0, bool),
        np.zeros(37, bool),
        np.ones(37, bool),
        np.eye(1, 100_000, 99_999, dtype=bool)[0],  # one nonzero after a 99,999-long gap
        np.eye(1, 70_000, 0, dtype=bool)[0],
        np.random.default_rng(2).random(10_001) < 0.3,
    ],
)
def test_positions_round_trip_every_method(method: str, mask: np.ndarray) -> None:
    enc = encode_positions(mask, method)
    np.testing.assert_array_equal(decode_positions(enc, mask.size), np.flatnonzero(mask))


def test_relative_index_uses_filler_entries_for_long_gaps() -> None:
    mask = np.zeros(5000, bool)
    mask[[10, 4000, 4001]] = True
    gaps = cpz._gaps(np.flatnonzero(mask))
    assert gaps.tolist() == [10, 3989, 0]
    symbols = cpz._escape(gaps, 3)  # fillers of 7 zeros: 1 for the gap of 10, 569 for 3989
    assert np.count_nonzero(symbols == 7) == 1 + 569
    assert symbols.size == 3 + 570
    np.testing.assert_array_equal(cpz._unescape(symbols, 3), gaps)


# --------------------------------------------------------------------------- writer validation


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "a\\b", "nul\x00name", "", ".hidden", "tab\tname", "x" * 1025]
)
def test_writer_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="tensor name"):
        pack_cpz({name: encode_raw(np.zeros(1))}, {})


def test_encoders_validate_their_input() -> None:
    book = np.array([0.0, 1.0], np.float32)
    with pytest.raises(ValueError):
        encode_clustered(np.array([0, 2]), book)  # index outside the codebook
    with pytest.raises(ValueError):
        encode_clustered(
            np.array([0, 1]), np.array([0.5, 1.0], np.float32)
        )  # zero_index centroid != 0
    with pytest.raises(TypeError):
        encode_clustered(np.array([0.0, 1.0]), book)
    with pytest.raises(TypeError):
        encode_int8(np.zeros(3, np.int16), 1.0)
    with pytest.raises(ValueError):
        encode_int8(
            np.zeros((3, 4), np.int8), np.ones(4, np.float32), np.zeros(4, np.int32), axis=0
        )
    with pytest.raises(TypeError):
        encode_raw(np.array(["a"]))


# --------------------------------------------------------------------------- hostile files


def _split(data: bytes) -> tuple[dict, dict, bytes]:
    """(metadata, table, payload) of a well-formed file."""
    off = cpz._HEADER.size
    mlen, _ = cpz._SECTION.unpack_from(data, off)
    meta = json.loads(data[off + 8 : off + 8 + mlen])
    off += 8 + mlen
    tlen, _ = cpz._SECTION.unpack_from(data, off)
    table = json.loads(data[off + 8 : off + 8 + tlen])
    return meta, table, data[off + 8 + tlen : -cpz._DIGEST_SIZE]


def _assemble(
    meta: Any,
    table: Any,
    payload: bytes,
    *,
    raw_meta: bytes | None = None,
    raw_table: bytes | None = None,
) -> bytes:
    """A file with every checksum valid, whatever its content."""
    m = raw_meta if raw_meta is not None else json.dumps(meta).encode()
    t = raw_table if raw_table is not None else json.dumps(table).encode()
    size = cpz._HEADER.size + 16 + len(m) + len(t) + len(payload) + cpz._DIGEST_SIZE
    body = b"".join(
        [
            cpz._HEADER.pack(cpz.MAGIC, cpz.JSON_VERSION, 0, size),
            cpz._SECTION.pack(len(m), zlib.crc32(m)),
            m,
            cpz._SECTION.pack(len(t), zlib.crc32(t)),
            t,
            payload,
        ]
    )
    return _seal(body)


def _seal(body: bytes) -> bytes:
    return body + hashlib.blake2b(body, digest_size=cpz._DIGEST_SIZE).digest()


def _reseal(data: bytes) -> bytes:
    """Recompute the whole-file digest (and the header length) of a mutated file."""
    body = bytearray(data[: -cpz._DIGEST_SIZE]) if len(data) > cpz._DIGEST_SIZE else bytearray()
    if len(body) >= cpz._HEADER.size:
        struct.pack_into("<Q", body, 8, len(body) + cpz._DIGEST_SIZE)
    return _seal(bytes(body))


def _with_blob(payload: bytes, ref: dict, new: bytes) -> bytes:
    """Payload with one blob's bytes replaced (same length) and the ref's crc updated."""
    assert len(new) == ref["length"]
    ref["crc32"] = zlib.crc32(new)
    return payload[: ref["offset"]] + new + payload[ref["offset"] + ref["length"] :]


def _expect_error(data: bytes, match: str | None = None) -> CpzFormatError:
    with pytest.raises(CpzFormatError, match=match) as info:
        unpack_cpz(data)
    return info.value


def test_sample_file_is_valid(sample_file: bytes) -> None:
    tensors, meta = unpack_cpz(sample_file)
    assert meta["arch"] == "resnet18" and len(tensors) == 3
    assert _assemble(*_split(sample_file)) is not None
    unpack_cpz(_assemble(*_split(sample_file)))


def test_every_truncation_is_rejected(sample_file: bytes) -> None:
    step = max(1, len(sample_file) // 150)
    cuts = sorted(
        set(range(0, len(sample_file), step)) | set(range(len(sample_file) - 40, len(sample_file)))
    )
    for cut in cuts:
        _expect_error(sample_file[:cut])
    _expect_error(sample_file + b"\x00", "header")


def test_seeded_mutations_are_rejected(sample_file: bytes) -> None:
    """Bit flips, byte overwrites, length-field overwrites, insertions and deletions."""
    rng = np.random.default_rng(RNG_SEED)
    fields = [4, 6, 8, 16, 20]  # version, flags, file length, metadata length, metadata crc
    for trial in range(300):
        data = bytearray(sample_file)
        kind = trial % 5
        if kind == 0:
            for pos in rng.integers(0, len(data) * 8, int(rng.integers(1, 9))):
                data[pos // 8] ^= 1 << (pos % 8)
        elif kind == 1:
            start = int(rng.integers(0, len(data) - 4))
            data[start : start + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        elif kind == 2:
            at = int(rng.choice(fields))
            value = int(rng.choice([0, 1, 2**31, 2**32 - 1, int(rng.integers(0, len(data)))]))
            data[at : at + 4] = struct.pack("<I", value)
            if data == sample_file:
                continue
        elif kind == 3:
            at = int(rng.integers(0, len(data)))
            data[at:at] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        else:
            at = int(rng.integers(0, len(data) - 1))
            del data[at : at + int(rng.integers(1, 16))]
        _expect_error(bytes(data))


def test_resealed_mutations_never_escape(sample_file: bytes) -> None:
    """With the file digest recomputed, structure checks and section checksums must still hold."""
    rng = np.random.default_rng(RNG_SEED + 1)
    rejected = 0
    for trial in range(300):
        data = bytearray(sample_file[: -cpz._DIGEST_SIZE])
        if trial % 3 == 0:
            pos = int(rng.integers(0, len(data) * 8))
            data[pos // 8] ^= 1 << (pos % 8)
        elif trial % 3 == 1:
            at = int(rng.integers(16, len(data) - 4))
            data[at : at + 4] = struct.pack(
                "<I", int(rng.choice([0, 2**32 - 1, int(rng.integers(0, 2**16))]))
            )
        else:
            at = int(rng.integers(0, len(data) - 8))
            del data[at : at + int(rng.integers(1, 8))]
        try:
            unpack_cpz(_reseal(bytes(data) + bytes(cpz._DIGEST_SIZE)))
        except CpzFormatError:
            rejected += 1
    assert rejected >= 290  # a flip inside e.g. the magic's NUL-free padding could be benign


def test_payload_mutations_with_valid_checksums_are_caught_or_harmless(sample_file: bytes) -> None:
    """Re-checksummed blob corruption: the decoder's own consistency checks must hold."""
    meta, table, payload = _split(sample_file)
    rng = np.random.default_rng(RNG_SEED + 2)
    refs = []
    for entry in table["tensors"]:
        for key in ("positions", "values"):
            if entry.get(key) and "stream" in entry[key]:
                refs.append((entry["name"], key, ("stream",)))
            elif entry.get(key):
                refs.append((entry["name"], key, ()))
    for trial in range(200):
        t = copy.deepcopy(table)
        name, key, path = refs[trial % len(refs)]
        entry = next(e for e in t["tensors"] if e["name"] == name)
        ref = entry[key]
        for p in path:
            ref = ref[p]
        ref = ref["blob"]
        if ref["length"] == 0:
            continue
        blob = bytearray(payload[ref["offset"] : ref["offset"] + ref["length"]])
        for pos in rng.integers(0, len(blob) * 8, int(rng.integers(1, 4))):
            blob[pos // 8] ^= 1 << (pos % 8)
        data = _assemble(meta, t, _with_blob(payload, ref, bytes(blob)))
        try:
            tensors, _ = unpack_cpz(data)
        except CpzFormatError as exc:
            assert f"tensor {name!r}" in str(exc)
        else:
            assert set(tensors) == {e["name"] for e in t["tensors"]}


def _edit_entry(sample_file: bytes, name: str, edit) -> bytes:
    meta, table, payload = _split(sample_file)
    entry = next(e for e in table["tensors"] if e["name"] == name)
    new_payload = edit(entry, payload)
    return _assemble(meta, table, payload if new_payload is None else new_payload)


CONV = "layer1.0.conv1.weight"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda e, p: e.update(shape=[10**5, 10**5, 10**5]), f"tensor '{CONV}'"),
        (lambda e, p: e.update(shape=[-1, 4]), "shape"),
        (lambda e, p: e.update(shape=[True, 4]), "shape"),
        (lambda e, p: e.update(shape=[1] * 40), "shape"),
        (lambda e, p: e.update(shape="(8, 4)"), "shape"),
        (lambda e, p: e.update(kind="pickle"), "unknown kind"),
        (lambda e, p: e.update(dtype="object"), "dtype"),
        (lambda e, p: e.update(extra=1), "unexpected keys"),
        (lambda e, p: e.pop("codebook") and None, "missing keys"),
        (lambda e, p: e.update(zero_index=99), "zero_index"),
        (lambda e, p: e["values"].update(alphabet=17), "values stream"),
        (lambda e, p: e["values"].update(count=10**12), "values stream: count"),
        (lambda e, p: e["values"].update(count=e["values"]["count"] + 1), "values stream"),
        (lambda e, p: e["values"].update(block_size=1000), "values stream"),
        (lambda e, p: e["values"].update(width=3), "values stream"),
        (lambda e, p: e["values"].update(coding="lzma"), "values stream"),
        (lambda e, p: e["values"]["blob"].update(offset=2**40), "values stream"),
        (lambda e, p: e["values"]["blob"].update(length=2**40), "values stream"),
        (lambda e, p: e["values"]["blob"].update(offset=0), f"tensor '{CONV}'"),
        (
            lambda e, p: e["values"]["blob"].update(crc32=e["values"]["blob"]["crc32"] ^ 1),
            "values stream: checksum",
        ),
        (lambda e, p: e["positions"].update(method="zip"), "positions"),
        (lambda e, p: e["positions"].update(count=e["positions"]["count"] + 1), f"tensor '{CONV}'"),
        (lambda e, p: e["positions"].update(bits=17), "positions: bits"),
        (lambda e, p: e["codebook"].update(shape=[2**50]), "codebook"),
        (lambda e, p: e["codebook"].update(dtype="float64"), "codebook"),
        (lambda e, p: e.update(name="../x"), "name"),
        (lambda e, p: e.update(name="a/b"), "name"),
        (lambda e, p: e.update(name="nul\x00"), "name"),
        (lambda e, p: e.update(name=7), "name"),
    ],
)
def test_hostile_section_table_edits(sample_file: bytes, edit, match: str) -> None:
    _expect_error(_edit_entry(sample_file, CONV, edit), match)


def _set_code_lengths(entry: dict, payload: bytes, lengths: list[int]) -> bytes:
    ref = entry["values"]["blob"]
    blob = bytearray(payload[ref["offset"] : ref["offset"] + ref["length"]])
    blob[: len(lengths)] = bytes(lengths)
    return _with_blob(payload, ref, bytes(blob))


@pytest.mark.parametrize(
    ("lengths", "match"),
    [
        ([1] * 16, "prefix code"),  # Kraft sum 8 with a valid crc and file digest
        ([0] + [25] * 15, r"lengths must lie in \[0, 24\]"),
        ([0] * 16, "no symbol has a code"),
        (
            [0, 1, 1] + [0] * 13,
            "values stream",
        ),  # valid code, but not the one the bits were written with
    ],
)
def test_bad_code_lengths_with_valid_checksums(
    sample_file: bytes, lengths: list[int], match: str
) -> None:
    err = _expect_error(
        _edit_entry(sample_file, CONV, lambda e, p: _set_code_lengths(e, p, lengths)), match
    )
    assert str(err).startswith(f"tensor '{CONV}': values stream")


def test_corrupt_stream_names_its_section(sample_file: bytes) -> None:
    _, table, payload = _split(sample_file)
    entry = next(e for e in table["tensors"] if e["name"] == CONV)
    at = len(sample_file) - cpz._DIGEST_SIZE - len(payload) + entry["values"]["blob"]["offset"] + 20
    data = bytearray(sample_file)
    data[at] ^= 0x10
    _expect_error(_reseal(bytes(data)), f"^tensor '{CONV}': values stream: checksum mismatch$")
    _expect_error(bytes(data), "^file: checksum mismatch$")


def test_table_level_hostility(sample_file: bytes) -> None:
    meta, table, payload = _split(sample_file)
    dup = copy.deepcopy(table)
    dup["tensors"].append(copy.deepcopy(dup["tensors"][-1]))
    _expect_error(_assemble(meta, dup, payload), "duplicate name|overlaps")
    _expect_error(_assemble(meta, table, payload + b"\x00"), "section table: blobs cover")
    _expect_error(_assemble(meta, {"tensors": {}}, payload), "section table")
    _expect_error(_assemble(meta, {"tensors": [], "x": 1}, payload), "section table")
    _expect_error(
        _assemble(meta, table, payload, raw_table=b"[" * 100_000 + b"]" * 100_000), "section table"
    )
    _expect_error(
        _assemble(meta, table, payload, raw_table=b'{"tensors": [], "tensors": []}'), "duplicate"
    )
    _expect_error(_assemble(meta, table, payload, raw_meta=b'{"loss": NaN}'), "metadata")
    _expect_error(_assemble(meta, table, payload, raw_meta=b"[1, 2]"), "metadata")
    _expect_error(_assemble(meta, table, payload, raw_meta=b"\xff\xfe"), "metadata")


def test_header_hostility(sample_file: bytes) -> None:
    _expect_error(b"PK\x03\x04" + sample_file[4:], "magic")
    _expect_error(b"", "header")
    for offset, value, match in [
        (4, struct.pack("<H", 3), "version 3 is not supported"),
        (6, struct.pack("<H", 1), "flags"),
        (8, struct.pack("<Q", 2**63), "header"),
        (16, struct.pack("<I", 2**32 - 1), "metadata: length"),
    ]:
        data = bytearray(sample_file)
        data[offset : offset + len(value)] = value
        _expect_error(bytes(data))
        if offset != 8:  # _reseal would repair the file length
            _expect_error(_reseal(bytes(data)), match)


def test_max_elements_bounds_sparse_decoding() -> None:
    book = np.array([0.0, 1.0], np.float32)
    data = pack_cpz({"big": encode_clustered(np.zeros((1000, 1000), np.uint8), book)}, {})
    assert len(data) < 1000
    with pytest.raises(CpzFormatError, match="max_elements"):
        unpack_cpz(data, max_elements=10**5)
    assert unpack_cpz(data)[0]["big"].indices.shape == (1000, 1000)


def test_read_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        read_cpz(tmp_path / "nope.cpz")
    assert not os.path.exists(tmp_path / "nope.cpz")


# --------------------------------------------------------------------------- all streams in one pass


@pytest.fixture(scope="module")
def multi_block_file() -> bytes:
    """Three clustered tensors whose positions and values streams all span several blocks."""
    rng = np.random.default_rng(RNG_SEED + 3)
    tensors = {}
    for name in ("a.weight", "b.weight", "c.weight"):
        idx, book = _pruned_clustered(rng, (96, 64, 3, 3), 0.1)
        tensors[name] = encode_clustered(idx, book)
    tensors["c.bias"] = encode_raw(rng.normal(size=96).astype(np.float32))
    return pack_cpz(tensors, {}, version=cpz.JSON_VERSION)


def _shift_block_boundary(sample: bytes, name: str, stream: str) -> bytes:
    """Start block 1 of a tensor's stream one bit late, every checksum kept valid."""
    meta, table, payload = _split(sample)
    entry = next(e for e in table["tensors"] if e["name"] == name)
    spec = entry[stream]["stream"] if stream == "positions" else entry[stream]
    ref = spec["blob"]
    blob = bytearray(payload[ref["offset"] : ref["offset"] + ref["length"]])
    start = spec["alphabet"] ** spec["group"]
    spans = np.frombuffer(blob[start:], dtype=f"<u{spec['width']}", count=2).copy()
    spans += np.array([1, -1]).astype(spans.dtype)
    blob[start : start + spans.nbytes] = spans.tobytes()
    return _assemble(meta, table, _with_blob(payload, ref, bytes(blob)))


def test_all_streams_are_decoded_in_one_call(
    multi_block_file: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    decode_many = huffman.decode_many
    monkeypatch.setattr(huffman, "decode_many", lambda s: calls.append(len(s)) or decode_many(s))
    monkeypatch.setattr(huffman, "decode", None)  # the per-stream path is not used at all
    tensors, _ = unpack_cpz(multi_block_file)
    assert calls == [6]  # positions and values of three tensors
    for name in ("a.weight", "b.weight", "c.weight"):
        assert tensors[name].indices.shape == (96, 64, 3, 3)
        assert np.count_nonzero(tensors[name].indices) == pytest.approx(0.1 * 96 * 64 * 9, abs=1)


@pytest.mark.parametrize("name", ["a.weight", "b.weight", "c.weight"])
@pytest.mark.parametrize("stream", ["positions", "values"])
def test_corrupt_block_names_its_tensor(multi_block_file: bytes, name: str, stream: str) -> None:
    _expect_error(
        _shift_block_boundary(multi_block_file, name, stream),
        f"^tensor '{name}': {stream} stream: block 0: bitstream does not decode to its recorded"
        " length$",
    )


def test_first_tensor_with_an_error_is_reported(multi_block_file: bytes) -> None:
    """Streams are decoded together, yet the error is still the first tensor's in the file."""
    late_block = _shift_block_boundary(multi_block_file, "c.weight", "values")
    # A crc checked before decoding (b) wins over a bad block of a later tensor (c) ...
    meta, table, payload = _split(late_block)
    entry = next(e for e in table["tensors"] if e["name"] == "b.weight")
    entry["codebook"]["blob"]["crc32"] ^= 1
    _expect_error(_assemble(meta, table, payload), "^tensor 'b.weight': codebook: checksum")
    # ... and loses to a bad block of an earlier tensor (a).
    early_block = _shift_block_boundary(multi_block_file, "a.weight", "positions")
    meta, table, payload = _split(early_block)
    entry = next(e for e in table["tensors"] if e["name"] == "b.weight")
    entry["values"]["blob"]["crc32"] ^= 1
    _expect_error(_assemble(meta, table, payload), "^tensor 'a.weight': positions stream: block 0")
    # A check after decoding (a's codebook zero entry) wins over a bad block of b.
    meta, table, payload = _split(_shift_block_boundary(multi_block_file, "b.weight", "values"))
    entry = next(e for e in table["tensors"] if e["name"] == "a.weight")
    ref = entry["codebook"]["blob"]
    book = np.frombuffer(payload[ref["offset"] : ref["offset"] + ref["length"]], "<f4").copy()
    book[0] = 1.0
    _expect_error(
        _assemble(meta, table, _with_blob(payload, ref, book.tobytes())),
        r"^tensor 'a.weight': codebook: entry 0 \(zero_index\) is not 0$",
    )
