"""Property-based fuzzing of the two readers of untrusted files.

* pipeline YAML: any text, mutated text or mutated structure either loads or raises ConfigError;
* .cpz: any mutation of a valid file (bytes, or JSON sections re-checksummed so the deeper
  checks are reached) raises CpzFormatError from the container reader and ArtifactError from
  the model reader, or decodes.

Examples are derandomized, so CI runs the same cases every time; each has a deadline.
"""

from __future__ import annotations

import copy
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from harness import (
    cpz2_assemble,
    cpz2_split,
    cpz_assemble,
    cpz_blob_refs,
    cpz_reseal,
    cpz_split,
    yaml_paths,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from compresspipe.core.errors import ArtifactError, ConfigError
from compresspipe.formats import CpzFormatError, cpz, encode_clustered, encode_raw, unpack_cpz
from compresspipe.pipeline.loader import Pipeline, load_pipeline

EXAMPLES = 200
FUZZ = settings(max_examples=EXAMPLES, deadline=10_000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

BASE_YAML = """\
name: fuzz
seed: 0
output_dir: {out}
model:
  name: test_resnet
data:
  name: digits
  image_size: 16
  batch_size: 64
tracking:
  enabled: false
  retries: 3
stages:
  - name: dense
    train:
      epochs: 2
      lr: 0.05
      warmup_epochs: 0.5
      record_rewind: {{epoch: 0.5}}
  - name: ticket
    prune:
      method: lth
      sparsity: 0.9
      rounds: 2
      scope: global
      train: {{epochs: 1, lr: 0.05}}
      distill: {{teacher: "stage:dense", temperature: 4}}
  - name: cluster
    cluster: {{conv_bits: 4, linear_bits: 4, finetune: {{epochs: 1, lr: 0.01}}}}
  - huffman: {{}}
"""

# YAML that means something: anchors, tags (python tags must be refused), merges, documents
TOKENS = ["\n", " ", "  ", "- ", ": ", ":", "{", "}", "[", "]", ",", "'", '"', "#", "&a ", "*a",
          "<<: *a", "!!python/object/apply:os.system ['true']", "!!python/name:os.system",
          "!!binary aGk=", "!!set {a}", "!!float", "? ", "|", ">", "---\n", "...\n", "%YAML 1.1\n",
          "~", "null", "true", "no", "1e999", "-.inf", ".nan", "0x1F", "0o17", "1_000",
          "2001-12-14", "\t", "\x00", "\ufeff", "é", "../../etc", "/abs/path", "stage:dense",
          "stage:nope", "999999999999999999999", "-1", "0", "epochs", "name", "stages", "train",
          "prune", "model", "factory: os:system", "factory: a.b:c", "pkg.mod:Stage"]

HOSTILE = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1, 2**31, 2**63, 10**100, -10**100, 0.5, 1e308,
                     float("inf"), float("-inf"), float("nan"), "", "../../x", "/etc/passwd",
                     "stage:dense", "stage:missing", "os:system", "a" * 10_000, "\x00", "é",
                     [], {}, [[[]]], {"a": {"b": {"c": None}}}, ["x"] * 50]),
    st.integers(-1000, 1000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.recursive(st.none() | st.integers() | st.text(max_size=5),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                      max_size=3),
                 max_leaves=8),
)


def _loads_or_config_error(source, record: bool = True) -> None:
    """The oracle: a Pipeline or a ConfigError, never anything else."""
    try:
        result = load_pipeline(source)
    except ConfigError as exc:
        assert str(exc) and exc.problems
        if record:
            event("ConfigError")
        return
    assert isinstance(result, Pipeline)
    if record:
        event("valid pipeline")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, str, dict]:
    root = tmp_path_factory.mktemp("fuzz")
    text = BASE_YAML.format(out=root / "never-written")
    _loads_or_config_error(yaml.safe_load(text), record=False)  # warm the model build once
    return root, text, yaml.safe_load(text)


def test_base_pipeline_is_valid(base):
    root, text, data = base
    (root / "base.yaml").write_text(text)
    assert [s.type for s in load_pipeline(root / "base.yaml").stages] == [
        "train", "prune", "cluster", "huffman"]


@FUZZ
@given(text=st.text(max_size=400) | st.binary(max_size=400).map(
    lambda b: b.decode("latin-1")))
def test_arbitrary_text(base, text):
    root = base[0]
    path = root / "arbitrary.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    _loads_or_config_error(path)


@st.composite
def mutated_text(draw, text: str) -> str:
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        j = min(len(text), i + draw(st.integers(0, 20)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "duplicate_line", "swap"]))
        if op == "insert":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
        elif op == "delete":
            text = text[:i] + text[j:]
        elif op == "replace":
            text = text[:i] + draw(st.sampled_from(TOKENS) | st.text(max_size=5)) + text[j:]
        elif op == "duplicate_line":
            lines = text.splitlines(keepends=True) or [""]
            k = draw(st.integers(0, len(lines) - 1))
            text = "".join(lines[: k + 1] + lines[k:])
        else:
            lines = text.splitlines(keepends=True)
            if len(lines) > 1:
                k = draw(st.integers(0, len(lines) - 2))
                lines[k], lines[k + 1] = lines[k + 1], lines[k]
                text = "".join(lines)
    return text


@FUZZ
@given(data=st.data())
def test_mutated_yaml_text(base, data):
    root, text, _ = base
    path = root / "mutated.yaml"
    path.write_text(data.draw(mutated_text(text)), encoding="utf-8", errors="surrogatepass")
    _loads_or_config_error(path)


def _set(root: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    parent = root
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = value
    return root


@FUZZ
@given(data=st.data())
def test_mutated_structure(base, data):
    """Values replaced, keys added or dropped anywhere; loaded from a dict and from YAML text."""
    root, _, original = base
    doc = copy.deepcopy(original)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(yaml_paths(doc)[1:]))  # the root stays a dict
        op = data.draw(st.sampled_from(["replace", "add_key", "drop"]))
        target = doc
        for part in path:
            target = target[part]
        if op == "add_key" and isinstance(target, dict):
            target[data.draw(st.sampled_from(["extra", "name", "factory", "epochs", "train",
                                              "uri", "kwargs", 0, None]))] = data.draw(HOSTILE)
        elif op == "drop" and path:
            parent = doc
            for part in path[:-1]:
                parent = parent[part]
            del parent[path[-1]]
        else:
            doc = _set(doc, path, data.draw(HOSTILE))
    _loads_or_config_error(doc)
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, RecursionError):
        return
    path = root / "structure.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _loads_or_config_error(path)


@pytest.mark.parametrize("bad", ["a" * 5000, "x/" + "a" * 300, "a\x00b", "\ud800"])
@pytest.mark.parametrize("where", ["model.checkpoint", "data.root", "output_dir",
                                   "distill.teacher", "distill.teacher_checkpoint"])
def test_unusable_paths_are_config_errors(base, where, bad):
    """Found by the soak: looking such a path up raised OSError (name too long) or
    UnicodeEncodeError from pathlib instead of a ConfigError."""
    doc = copy.deepcopy(base[2])
    if where == "data.root":
        doc["data"] = {"name": "imagefolder", "root": bad}
    elif where.startswith("distill."):
        doc["stages"].append({"distill": {"teacher": "test_resnet", where[8:]: bad}})
    else:
        _set(doc, tuple(where.split(".")), bad)
    with pytest.raises(ConfigError, match=r"NUL|too long|cannot encode"):
        load_pipeline(doc)


# -- .cpz --------------------------------------------------------------------------------------


JSON_HOSTILE = st.one_of(
    st.sampled_from([None, True, 0, -1, 1, 3, 255, 256, 2**16, 2**31, 2**32, 2**62, 2**64, 0.5,
                     "", "huffman", "raw", "relidx", "runs", "bitmap", "float32", "int64",
                     "bool", "clustered", "int8", "../x", [], [0], [2**31, 2**31], {}]),
    st.integers(-2**70, 2**70),
    st.lists(st.integers(0, 2**20), max_size=4),
)


@st.composite
def mutated_cpz(draw, data: bytes) -> bytes:
    """Byte mutations (caught by the digest), the same with the digest recomputed (caught by
    the section checks), JSON edits and blob edits with every checksum valid (reaching the
    table validation and the Huffman, position and tensor decoders)."""
    kind = draw(st.sampled_from(["bytes", "resealed", "json", "blob", "blob"]))
    if data[4] == cpz.VERSION and kind in ("json", "blob"):
        return draw(mutated_cpz2(data, kind))
    if kind == "blob":
        meta, table, payload = cpz_split(data)
        refs = [r for r in cpz_blob_refs(table) if r["length"]]
        ref = draw(st.sampled_from(refs))
        blob = bytearray(payload[ref["offset"]: ref["offset"] + ref["length"]])
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(blob) - 1))
            if draw(st.booleans()):
                blob[at] ^= 1 << draw(st.integers(0, 7))
            else:
                blob[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        ref["crc32"] = zlib.crc32(blob)
        payload = payload[: ref["offset"]] + bytes(blob) + payload[ref["offset"] + len(blob):]
        return cpz_assemble(meta, table, payload)
    if kind == "json":
        meta, table, payload = cpz_split(data)
        doc = {"meta": meta, "table": table}
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(yaml_paths(doc)[1:]))
            doc = _set(doc, path, draw(JSON_HOSTILE))
        try:
            return cpz_assemble(doc["meta"], doc["table"], payload)
        except (ValueError, TypeError):
            return data
    buf = bytearray(data if kind == "bytes" else data[: -cpz._DIGEST_SIZE])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "byte", "u32", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and buf:
            buf[at] = draw(st.integers(0, 255))
        elif op == "u32" and len(buf) >= 4:
            at = min(at, len(buf) - 4)
            value = draw(st.sampled_from([0, 1, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1))
            buf[at: at + 4] = struct.pack("<I", value)
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[at: at + draw(st.integers(1, 16))]
        else:
            del buf[at:]
    return bytes(buf) if kind == "bytes" else cpz_reseal(bytes(buf))


@st.composite
def mutated_cpz2(draw, data: bytes, kind: str) -> bytes:
    """Version 2, every checksum valid: bytes of the inflated binary table or metadata edited
    ("json"), or bytes of one blob of the payload ("blob"; its offsets come from the table)."""
    from compresspipe.formats.cpz.parse import parse

    meta, table, payload = cpz2_split(data)
    which = "payload" if kind == "blob" else draw(st.sampled_from(["table", "table", "meta"]))
    target = bytearray({"payload": payload, "table": table, "meta": meta}[which])
    start, end = 0, len(target)
    if kind == "blob":
        blobs = [b for e in parse(data, 1 << 30).entries for b in e.blobs() if b.length]
        blob = draw(st.sampled_from(blobs))
        start, end = blob.offset, blob.offset + blob.length
    for _ in range(draw(st.integers(1, 4))):
        if end <= start:
            break
        at = draw(st.integers(start, end - 1))
        op = draw(st.sampled_from(["flip", "byte"] if kind == "blob" else ["flip", "byte", "cut"]))
        if op == "flip":
            target[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            target[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
        else:
            del target[at:]
            end = at
    parts = {"meta": meta, "table": table, "payload": payload, which: bytes(target)}
    return cpz2_assemble(parts["meta"], parts["table"], parts["payload"])


@pytest.fixture(scope="module")
def container_tensors() -> dict:
    """Every coding the reader knows: clustered with each position method, raw, empty."""
    rng = np.random.default_rng(7)
    tensors = {}
    for name, density in (("sparse", 0.05), ("mid", 0.4), ("dense", 1.0)):
        w = rng.normal(size=(6, 4, 3, 3)).astype(np.float32)
        keep = np.abs(w) >= np.quantile(np.abs(w), 1 - density)
        idx = np.where(keep, rng.integers(1, 16, size=w.shape), 0).astype(np.uint8)
        book = np.concatenate([[0.0], np.linspace(-1, 1, 15)]).astype(np.float32)
        tensors[f"{name}.weight"] = encode_clustered(idx, book)
    tensors["bias"] = encode_raw(rng.normal(size=6).astype(np.float16))
    tensors["empty"] = encode_raw(np.zeros((0, 3), np.float32))
    return tensors


@pytest.fixture(scope="module", params=[cpz.JSON_VERSION, cpz.VERSION])
def container_file(request, container_tensors) -> bytes:
    """The same tensors in both versions the reader handles."""
    return cpz.pack_cpz(container_tensors, {"arch": "fuzz", "n": 1}, version=request.param)


@FUZZ
@given(data=st.data())
def test_cpz_container_reader(container_file, data):
    blob = data.draw(mutated_cpz(container_file))
    try:
        tensors, meta = unpack_cpz(blob, max_elements=1 << 24)
    except CpzFormatError as exc:
        assert str(exc)
        event(f"CpzFormatError: {str(exc).split(':')[0][:20]}")
        return
    assert isinstance(meta, dict)
    event("decoded")
    for t in tensors.values():
        t.to_dense()  # whatever decodes must also densify


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> bytes:
    """A real test_resnet model as a .cpz, as the huffman stage writes it."""
    import timm
    import torch

    from compresspipe.core.artifact import Artifact
    from compresspipe.formats.cpz_model import write_model_cpz

    torch.manual_seed(0)
    spec = {"source": "timm", "name": "test_resnet", "kwargs": {"in_chans": 1, "num_classes": 10}}
    model = timm.create_model("test_resnet", **spec["kwargs"]).eval()
    path = tmp_path_factory.mktemp("cpz") / "model.cpz"
    write_model_cpz(Artifact(model=model, spec=spec,
                             lineage=[{"name": "dense", "type": "train", "config": {}}]),
                    path, float_dtype="float16")
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_cpz_model_reader(model_file, tmp_path_factory, data):
    from compresspipe.formats.cpz_model import read_model_cpz

    path = tmp_path_factory.getbasetemp() / "fuzzed.cpz"
    path.write_bytes(data.draw(mutated_cpz(model_file)))
    try:
        art = read_model_cpz(path)
    except ArtifactError as exc:
        assert str(path) in str(exc)
        event(f"ArtifactError: {str(exc).removeprefix(str(path) + ': ').split(':')[0][:24]}")
        return
    assert art.model is not None and isinstance(art.lineage, list)
    event("decoded")
