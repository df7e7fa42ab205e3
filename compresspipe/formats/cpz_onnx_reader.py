"""A self-contained reader of ``.cpz`` files that hold an ONNX graph: numpy, the standard library
and onnxruntime only, no torch and no compresspipe. Copy this one file to a device.

    import cpz_onnx_reader
    session = cpz_onnx_reader.inference_session("model.cpz")
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]

The file (format version 2, docs/format.md) holds the ONNX model with every initializer marked as
external data (the "skeleton", zlib-compressed, as a uint8 tensor) and the initializers themselves
as coded tensors: pruned weights as sparse positions, shared weights as Huffman-coded indices into
a codebook. :func:`read_tensors` decodes them into dense numpy arrays; :func:`inference_session`
hands them to onnxruntime as external initializers, so the model is never written out.

Every problem is a :class:`CpzReadError` naming the part at fault. The full reader with every
check of the format (and version 1) is ``compresspipe.formats.cpz``; this one checks the digest
first, so a corrupted file never reaches the decoders, and bounds every allocation it makes.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib

import numpy as np

VERSION = 2
_HEADER = struct.Struct("<4sHHQ")
_SECTION = struct.Struct("<II")
_DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
           "float16", "float32", "float64")
_KINDS = ("clustered", "int8", "raw")
_METHODS = (None, "relidx", "runs", "bitmap")
ONNX_KEY = "onnx_runtime"
MAX_INFLATED = 1 << 28
MAX_ELEMENTS = 1 << 32
MAX_CODE_LEN = 16  # the compresspipe writer's limit; longer codes are refused here


class CpzReadError(ValueError):
    """The file is not a readable .cpz holding an ONNX graph."""


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.offset = data, 0, 0

    def u8(self) -> int:
        if self.pos >= len(self.data):
            raise CpzReadError("section table ends early")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value
            if shift > 63:
                raise CpzReadError("varint too long")

    def shape(self) -> tuple[int, ...]:
        ndim = self.varint()
        if ndim > 32:
            raise CpzReadError(f"rank {ndim}")
        return tuple(self.varint() for _ in range(ndim))

    def blob(self, length: int) -> tuple[int, int]:
        self.offset += length
        return self.offset - length, length

    def stream(self) -> dict:
        count, group, log_block, width = self.varint(), self.u8(), self.u8(), self.u8()
        if group not in (1, 2) or not 4 <= log_block <= 16 or width not in (2, 4):
            raise CpzReadError("bad stream descriptor")
        return {"count": count, "group": group, "block_size": 1 << log_block, "width": width,
                "blob": self.blob(self.varint())}


def _inflate(raw: bytes, where: str) -> bytes:
    if not raw or raw[0] not in (0, 1, 2):
        raise CpzReadError(f"{where}: unknown codec")
    if raw[0] == 0:
        return raw[1:]
    try:
        if raw[0] == 1:
            inflate = zlib.decompressobj()
            out = inflate.decompress(raw[1:], MAX_INFLATED)
            ok = inflate.eof and not inflate.unconsumed_tail
        else:
            import lzma  # lazy: only xz blocks need it

            unxz = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
            out, ok = unxz.decompress(raw[1:], MAX_INFLATED), unxz.eof
    except Exception as exc:  # zlib.error, LZMAError: one error type for the caller
        raise CpzReadError(f"{where}: {exc}") from exc
    if not ok:
        raise CpzReadError(f"{where}: incomplete or too large")
    return out


def _sections(data: bytes) -> tuple[dict, bytes, memoryview]:
    """(metadata, inflated table, payload) after the header and digest checks."""
    if len(data) < _HEADER.size + 2 * _SECTION.size + 32:
        raise CpzReadError("file too short")
    magic, version, flags, length = _HEADER.unpack_from(data, 0)
    if magic != b"CPZ\x00":
        raise CpzReadError("not a .cpz file")
    if version != VERSION or flags:
        raise CpzReadError(f"format version {version} (flags {flags}) is not supported: this "
                           f"reader handles version {VERSION}; re-encode with compresspipe")
    if length != len(data):
        raise CpzReadError("file length does not match its header (truncated?)")
    if hashlib.blake2b(data[:-32], digest_size=32).digest() != data[-32:]:
        raise CpzReadError("file checksum mismatch")
    blocks, pos = [], _HEADER.size
    for where in ("metadata", "section table"):
        size, crc = _SECTION.unpack_from(data, pos)
        raw = data[pos + _SECTION.size: pos + _SECTION.size + size]
        if len(raw) != size or zlib.crc32(raw) != crc:
            raise CpzReadError(f"{where}: bad length or checksum")
        blocks.append(_inflate(raw, where))
        pos += _SECTION.size + size
    try:
        metadata = json.loads(blocks[0].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CpzReadError(f"metadata: {exc}") from exc
    if not isinstance(metadata, dict):
        raise CpzReadError("metadata: not an object")
    return metadata, blocks[1], memoryview(data)[pos:-32]


def _entries(table: bytes) -> list[dict]:
    cur, out = _Cursor(table), []
    for _ in range(cur.varint()):
        n = cur.varint()
        name = bytes(cur.data[cur.pos: cur.pos + n])
        cur.pos += n
        e = {"name": name.decode("utf-8", "replace"), "kind": _KINDS[min(cur.u8(), 2)]}
        e["dtype"] = np.dtype(_DTYPES[min(cur.u8(), len(_DTYPES) - 1)]).newbyteorder("<")
        e["shape"] = cur.shape()
        size = int(np.prod(e["shape"], dtype=object))
        if e["kind"] == "raw":
            e["values"] = cur.blob(size * e["dtype"].itemsize)
        else:
            if e["kind"] == "clustered":
                k, zero = cur.varint(), cur.varint()
                e["zero"], e["alphabet"] = zero - 1, k
                e["codebook"] = cur.blob(4 * k)
            else:
                e["axis"], e["alphabet"] = cur.varint() - 1, 256
                for key in ("scale", "zero_point"):
                    dtype = np.dtype(_DTYPES[min(cur.u8(), len(_DTYPES) - 1)]).newbyteorder("<")
                    shape = cur.shape()
                    e[key] = (dtype, cur.blob(int(np.prod(shape, dtype=object)) * dtype.itemsize))
            method = _METHODS[min(cur.u8(), 3)]
            e["positions"] = None
            if method is not None:
                pos = {"method": method, "count": cur.varint()}
                if method == "bitmap":
                    pos["blob"] = cur.blob((size + 7) // 8)
                else:
                    pos["bits"] = cur.u8()
                    pos["stream"] = cur.stream()
                e["positions"] = pos
            e["values"] = cur.stream()
        e["size"] = size
        out.append(e)
    if cur.pos != len(table):
        raise CpzReadError("section table: trailing bytes")
    return out


def _prepare(payload: memoryview, spec: dict, alphabet: int) -> dict:
    """A stream's code tables and blocks, checked; decoding is left to :func:`_decode_all`."""
    offset, length = spec["blob"]
    raw = bytes(payload[offset: offset + length])
    coded_alphabet = alphabet ** spec["group"]
    n = -(-spec["count"] // spec["group"])
    n_blocks = -(-n // spec["block_size"])
    table_end = coded_alphabet + n_blocks * spec["width"]
    if len(raw) != length or length < table_end or spec["count"] > 8 * spec["group"] * length:
        raise CpzReadError("stream: bad sizes")
    lengths = np.frombuffer(raw[:coded_alphabet], np.uint8).astype(np.int64)
    spans = np.frombuffer(raw[coded_alphabet:table_end], f"<u{spec['width']}").astype(np.int64)
    max_len = int(lengths.max(initial=0))
    if n and not 1 <= max_len <= MAX_CODE_LEN or np.sum(2.0 ** -lengths[lengths > 0]) > 1:
        raise CpzReadError("stream: bad code lengths")
    max_len = max(max_len, 1)
    # canonical codes (RFC 1951): by length, then symbol; a table indexed by the next max_len
    # bits (LSB-first, so by the bit-reversed code) gives symbol and length
    symbols = np.flatnonzero(lengths)
    symbols = symbols[np.lexsort((symbols, lengths[symbols]))]
    sym_table = np.zeros(1 << max_len, np.int64)
    len_table = np.zeros(1 << max_len, np.int64)
    code, prev = 0, 0
    for sym in symbols:
        code <<= int(lengths[sym]) - prev
        prev = int(lengths[sym])
        rev = int(format(code, f"0{prev}b")[::-1], 2)
        sym_table[rev::1 << prev] = sym
        len_table[rev::1 << prev] = prev
        code += 1
    starts = np.concatenate([[0], np.cumsum(spans)])
    if starts[-1] > 8 * (len(raw) - table_end):
        raise CpzReadError("stream: blocks run past the data")
    counts = np.minimum(spec["block_size"], n - np.arange(n_blocks) * spec["block_size"])
    return {"spec": spec, "alphabet": alphabet, "n": n, "bits": raw[table_end:],
            "starts": starts, "counts": counts, "max_len": max_len,
            "sym": sym_table, "len": len_table}


def _decode_all(jobs: list[dict]) -> list[np.ndarray]:
    """Decode the streams together: one cursor per block of every stream, all advanced by one
    code per numpy step (so the steps are a block's length, not the file's)."""
    if not jobs:
        return []
    byte_base = np.cumsum([0] + [len(j["bits"]) for j in jobs])
    table_base = np.cumsum([0] + [j["sym"].size for j in jobs])
    out_base = np.cumsum([0] + [j["n"] for j in jobs])
    bits = np.frombuffer(b"".join(j["bits"] for j in jobs) + bytes(8), np.uint8).astype(np.uint64)
    sym_table = np.concatenate([j["sym"] for j in jobs])
    len_table = np.concatenate([j["len"] for j in jobs])
    lane_job = np.concatenate([np.full(j["counts"].size, i) for i, j in enumerate(jobs)])
    cursor = np.concatenate([j["starts"][:-1] + 8 * byte_base[i] for i, j in enumerate(jobs)])
    ends = np.concatenate([j["starts"][1:] + 8 * byte_base[i] for i, j in enumerate(jobs)])
    counts = np.concatenate([j["counts"] for j in jobs])
    first = np.concatenate([out_base[i] + np.arange(j["counts"].size) * j["spec"]["block_size"]
                            for i, j in enumerate(jobs)])
    mask = np.array([(1 << j["max_len"]) - 1 for j in jobs], np.uint64)[lane_job]
    offset = table_base[:-1][lane_job]
    out = np.empty(out_base[-1], np.int64)
    for step in range(int(counts.max(initial=0))):
        live = np.flatnonzero(counts > step) if step >= counts.min(initial=0) else slice(None)
        pos = cursor[live]
        byte = pos >> 3
        window = (bits[byte] | bits[byte + 1] << np.uint64(8) | bits[byte + 2] << np.uint64(16)
                  | bits[byte + 3] << np.uint64(24)) >> (pos & 7).astype(np.uint64) & mask[live]
        index = offset[live] + window.astype(np.int64)
        got = len_table[index]
        if not got.all():
            raise CpzReadError("stream: invalid code")
        out[first[live] + step] = sym_table[index]
        cursor[live] = pos + got
    if not np.array_equal(cursor, ends):
        raise CpzReadError("stream: block lengths do not match the codes")
    decoded = []
    for i, j in enumerate(jobs):
        values = out[out_base[i]: out_base[i + 1]]
        if j["spec"]["group"] == 2:
            values = np.stack([values // j["alphabet"], values % j["alphabet"]], 1).reshape(-1)
        decoded.append(values[: j["spec"]["count"]])
    return decoded


def _positions(payload: memoryview, pos: dict, size: int, symbols: np.ndarray | None
               ) -> np.ndarray:
    if pos["method"] == "bitmap":
        offset, length = pos["blob"]
        flags = np.unpackbits(np.frombuffer(payload[offset: offset + length], np.uint8),
                              count=size, bitorder="little")
        found = np.flatnonzero(flags)
    else:
        escape = (1 << pos["bits"]) - 1
        final = np.flatnonzero(symbols != escape)
        values = (np.diff(final, prepend=-1) - 1) * escape + symbols[final]
        if pos["method"] == "relidx":
            found = np.cumsum(values + 1) - 1
        else:
            runs = values.copy()
            runs[1:] += 1
            ones = runs[1::2]
            starts = np.cumsum(runs)[0::2][: ones.size]
            found = np.arange(int(ones.sum())) + np.repeat(starts - (np.cumsum(ones) - ones), ones)
    if found.size != pos["count"] or (found.size and not 0 <= found[0] <= found[-1] < size):
        raise CpzReadError("positions do not match their count")
    return found


def _tensor(payload: memoryview, e: dict, streams: list[np.ndarray]) -> np.ndarray:
    """A tensor from its blobs and its decoded streams (values, then positions if coded)."""
    def array(blob: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        offset, length = blob
        return np.frombuffer(payload[offset: offset + length], dtype).astype(dtype.newbyteorder("="))

    if e["kind"] == "raw":
        return array(e["values"], e["dtype"]).reshape(e["shape"])
    values = streams[0]
    coded_positions = streams[1] if len(streams) > 1 else None
    if e["kind"] == "clustered":
        book = array(e["codebook"], np.dtype("<f4"))
        if values.size and values.max() >= book.size:
            raise CpzReadError("cluster index outside the codebook")
        if e["positions"] is None:
            return book[values].reshape(e["shape"])
        dense = np.full(e["size"], book[e["zero"]], np.float32)
        dense[_positions(payload, e["positions"], e["size"], coded_positions)] = book[values]
        return dense.reshape(e["shape"])
    q = (values.astype(np.uint8) ^ np.uint8(0x80)).view(np.int8)
    if e["positions"] is None:
        return q.reshape(e["shape"])
    zero_point = array(*reversed(e["zero_point"]))
    view = [1] * len(e["shape"])
    if e["axis"] >= 0:
        view[e["axis"]] = -1
    dense = np.broadcast_to(zero_point.astype(np.int8).reshape(view), e["shape"]).copy()
    dense.reshape(-1)[_positions(payload, e["positions"], e["size"], coded_positions)] = q
    return dense


def read_tensors(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """({name: dense array}, metadata) of a version-2 .cpz file."""
    with open(path, "rb") as f:
        data = f.read()
    metadata, table, payload = _sections(data)
    try:
        entries = _entries(table)
    except (IndexError, ValueError, OverflowError) as exc:
        raise CpzReadError(f"section table: {exc}") from exc
    if sum(e["size"] for e in entries) > MAX_ELEMENTS:
        raise CpzReadError("more elements than this reader decodes")
    if not entries or sum(b[1] for e in entries for b in _blobs(e)) != len(payload):
        raise CpzReadError("section table does not cover the payload")
    try:
        jobs = [[] if e["kind"] == "raw" else
                [_prepare(payload, e["values"], e["alphabet"])] +
                ([_prepare(payload, e["positions"]["stream"], 1 << e["positions"]["bits"])]
                 if e["positions"] and "stream" in e["positions"] else [])
                for e in entries]
        decoded = iter(_decode_all([j for per in jobs for j in per]))
    except (IndexError, ValueError, OverflowError) as exc:
        raise CpzReadError(f"streams: {exc}") from exc
    tensors = {}
    for e, per in zip(entries, jobs):
        streams = [next(decoded) for _ in per]
        try:
            tensors[e["name"]] = _tensor(payload, e, streams)
        except (IndexError, ValueError, OverflowError) as exc:
            raise CpzReadError(f"tensor {e['name']!r}: {exc}") from exc
    return tensors, metadata


def _blobs(e: dict) -> list[tuple[int, int]]:
    if e["kind"] == "raw":
        return [e["values"]]
    side = [e["codebook"]] if e["kind"] == "clustered" else [e["scale"][1], e["zero_point"][1]]
    pos = e["positions"]
    if pos is not None:
        side.append(pos["blob"] if pos["method"] == "bitmap" else pos["stream"]["blob"])
    return [*side, e["values"]["blob"]]


def onnx_model(path: str) -> tuple[bytes, dict[str, np.ndarray]]:
    """(the ONNX skeleton, whose initializers are all external data; those initializers)."""
    tensors, metadata = read_tensors(path)
    info = metadata.get(ONNX_KEY)
    if not isinstance(info, dict) or info.get("graph") not in tensors:
        raise CpzReadError(f"metadata has no {ONNX_KEY!r} entry naming the graph tensor: "
                           "this .cpz does not hold an ONNX model")
    graph = tensors.pop(info["graph"])
    inflate = zlib.decompressobj()
    try:
        skeleton = inflate.decompress(graph.tobytes(), MAX_INFLATED)
    except zlib.error as exc:
        raise CpzReadError(f"ONNX graph: {exc}") from exc
    if not inflate.eof:
        raise CpzReadError("ONNX graph: incomplete or too large")
    for name in info.get("float32", []):  # vectors stored as float16 feed float32 inputs
        if name in tensors:
            tensors[name] = tensors[name].astype(np.float32)
    return skeleton, tensors


def inference_session(path: str, providers: list[str] | None = None, **options):
    """An ``onnxruntime.InferenceSession`` of the ONNX model a .cpz holds."""
    import onnxruntime as ort  # lazy: read_tensors alone needs only numpy

    skeleton, tensors = onnx_model(path)
    session_options = ort.SessionOptions()
    for key, value in options.items():
        setattr(session_options, key, value)
    names = list(tensors)
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensors[n])) for n in names]
    session_options.add_external_initializers(names, values)
    session = ort.InferenceSession(skeleton, session_options,
                                   providers=providers or ["CPUExecutionProvider"])
    session._cpz_initializers = values  # the session reads them: keep them alive with it
    return session
