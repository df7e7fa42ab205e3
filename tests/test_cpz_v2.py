"""Format version 2 of the .cpz container: the binary section table, the compressed metadata and
section blocks, the byte breakdown of a file, and the coded 1-D tensors; version-1 files still
read (their reader is tested in depth in test_cpz.py)."""

from __future__ import annotations

import numpy as np
import pytest
from harness import cpz2_assemble, cpz2_split

from compresspipe.formats import (
    CpzFormatError,
    container_parts,
    cpz,
    encode_clustered,
    encode_int8,
    encode_raw,
    pack_cpz,
    unpack_cpz,
)
from compresspipe.formats.cpz import table as cpz_table
from compresspipe.formats.vectors import assignment, encode_vector, kmeans_1d, vector_options

RNG_SEED = 16


def _tensors(rng: np.random.Generator) -> dict[str, cpz.TensorEncoding]:
    book = np.concatenate([[0.0], np.linspace(-1, 1, 15)]).astype(np.float32)
    out = {}
    for i, density in enumerate((0.03, 0.3, 1.0)):
        keep = rng.random((32, 16, 3, 3)) < density
        idx = np.where(keep, rng.integers(1, 16, keep.shape), 0).astype(np.uint8)
        out[f"layer{i}.conv.weight"] = encode_clustered(idx, book)
    q = rng.integers(-128, 128, (8, 20)).astype(np.int8)
    q[:, ::3] = 3
    out["fc.weight"] = encode_int8(q, rng.random(8).astype(np.float32) + 0.1,
                                   np.full(8, 3, np.int8), axis=0)
    out["fc.bias"] = encode_raw(rng.normal(size=8).astype(np.float32))
    out["empty"] = encode_raw(np.zeros((0, 4), np.float16))
    return out


@pytest.fixture(scope="module")
def files() -> tuple[bytes, bytes]:
    tensors = _tensors(np.random.default_rng(RNG_SEED))
    meta = {"spec": {"name": "x" * 50}, "lineage": [{"stage": i, "config": {"lr": 0.1}}
                                                    for i in range(30)]}
    return pack_cpz(tensors, meta), pack_cpz(tensors, meta, version=cpz.JSON_VERSION)


def _same(a, b) -> None:
    assert type(a) is type(b)
    for field in ("indices", "codebook", "q", "scale", "zero_point", "array"):
        if hasattr(a, field):
            x, y = getattr(a, field), getattr(b, field)
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def test_both_versions_decode_to_the_same_tensors(files):
    v2, v1 = files
    assert v2[4:6] == b"\x02\x00" and v1[4:6] == b"\x01\x00"
    (t2, m2), (t1, m1) = unpack_cpz(v2), unpack_cpz(v1)
    assert m1 == m2 and list(t1) == list(t2)
    for name in t1:
        _same(t1[name], t2[name])


def test_binary_table_and_compressed_metadata_shrink_the_container(files):
    v2, v1 = files
    p2, p1 = container_parts(v2), container_parts(v1)
    for parts, data in ((p2, v2), (p1, v1)):
        total = sum(v for k, v in parts.items() if k not in ("overhead", "file", "version"))
        assert total == parts["file"] == len(data)
    assert p2["positions"] == p1["positions"] and p2["values"] == p1["values"]
    assert p2["container_section_table"] * 5 < p1["container_section_table"]
    assert p2["container_metadata"] * 3 < p1["container_metadata"]
    assert len(v1) - len(v2) > 900


def test_unknown_version_is_refused_by_number(files):
    data = bytearray(files[0])
    data[4:6] = (7).to_bytes(2, "little")
    with pytest.raises(CpzFormatError, match=r"^header: format version 7 is not supported"):
        unpack_cpz(bytes(data))


def test_binary_table_mutations_raise_format_errors_only(files):
    """Every table edit with all checksums valid: a CpzFormatError naming a section, or a file
    that decodes (and densifies)."""
    meta, table, payload = cpz2_split(files[0])
    assert unpack_cpz(cpz2_assemble(meta, table, payload))[1] == unpack_cpz(files[0])[1]
    rng = np.random.default_rng(RNG_SEED)
    outcomes = {"error": 0, "decoded": 0}
    for trial in range(240):
        t = bytearray(table)
        op = trial % 4
        at = int(rng.integers(0, len(t)))
        if op == 0:
            t[at] ^= 1 << int(rng.integers(0, 8))
        elif op == 1:
            t[at] = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF]))
        elif op == 2:
            del t[at:]
        else:
            t[at:at] = rng.integers(0, 256, int(rng.integers(1, 6)), dtype=np.uint8).tobytes()
        try:
            tensors, _ = unpack_cpz(cpz2_assemble(meta, bytes(t), payload), max_elements=1 << 20)
        except CpzFormatError as exc:
            assert str(exc).split(":")[0] in ("section table", "file", "metadata") or \
                str(exc).startswith("tensor ")
            outcomes["error"] += 1
            continue
        for tensor in tensors.values():
            tensor.to_dense()
        outcomes["decoded"] += 1
    assert outcomes["error"] > 180


@pytest.mark.parametrize("raw, match", [
    (b"", "unknown codec"), (b"\x07abc", "unknown codec"), (b"\x01not zlib", "section table"),
    (b"\x02not xz", "section table")])
def test_bad_blocks(files, raw, match):
    import hashlib
    import zlib

    meta, _, payload = cpz2_split(files[0])
    good = cpz2_assemble(meta, b"\x00", b"")
    head = good[: cpz._HEADER.size]
    meta_block = cpz_table.pack_block(meta)
    body = (head + cpz._SECTION.pack(len(meta_block), zlib.crc32(meta_block)) + meta_block
            + cpz._SECTION.pack(len(raw), zlib.crc32(raw)) + raw + payload)
    body = body[:8] + (len(body) + 32).to_bytes(8, "little") + body[16:]
    with pytest.raises(CpzFormatError, match=match):
        unpack_cpz(body + hashlib.blake2b(body, digest_size=32).digest())


def test_inflation_is_bounded(files, monkeypatch):
    meta, table, payload = cpz2_split(files[0])
    monkeypatch.setattr(cpz_table, "MAX_INFLATED", 64)
    with pytest.raises(CpzFormatError, match="inflating to at most 64 bytes"):
        unpack_cpz(cpz2_assemble(b"{" + b" " * 400 + b"}", table, payload))


def test_kmeans_1d_is_deterministic_and_tight():
    x = np.random.default_rng(0).normal(size=500).astype(np.float32)
    book, idx = kmeans_1d(x, 16)
    assert book.size == 16 and np.all(np.diff(book) > 0)
    again = kmeans_1d(x, 16)
    assert np.array_equal(book, again[0]) and np.array_equal(idx, again[1])
    grid = np.linspace(x.min(), x.max(), 16)  # k-means must beat a uniform 16-level grid
    uniform = grid[np.abs(x[:, None] - grid).argmin(1)]
    assert np.mean((book[idx] - x) ** 2) < 0.8 * np.mean((uniform - x) ** 2)


def test_vector_codings_decode_to_what_they_promise():
    x = np.random.default_rng(1).normal(size=300).astype(np.float32)
    options = vector_options(x)
    assert set(options) >= {"fp32", "fp16", "cb4", "cb5", "cb6"}  # cb8: 256 x 4 B too big
    for how, (decoded, enc) in options.items():
        tensor = unpack_cpz(pack_cpz({"v": enc}, {}))[0]["v"]
        assert np.array_equal(tensor.to_dense(), decoded), how
        if how != "fp32":
            assert enc.nbytes < x.nbytes
    assert np.array_equal(options["fp32"][0], x)
    assert assignment({"v": options}, "cb4") == {"v": "cb4"}
    small = vector_options(np.random.default_rng(2).normal(size=20).astype(np.float32))
    assert assignment({"s": small}, "cb4") == {"s": "fp16"}
    with pytest.raises(ValueError, match="no vector coding"):
        encode_vector(np.ones(10, np.float32), "cb4")


def _choose(model, x, y, batch: int = 64, masks: dict | None = None):
    """choose_vectors on a model whose validation data is (x, y): (chosen, expected, logged)."""
    from types import SimpleNamespace

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from compresspipe.core.artifact import Artifact
    from compresspipe.stages.vector_choice import choose_vectors

    logged = {}
    ctx = SimpleNamespace(
        data=SimpleNamespace(val_loader=lambda purpose: DataLoader(TensorDataset(x, y), batch)),
        device=torch.device("cpu"), seed=0, log_metrics=lambda m, step: logged.update(m))
    chosen, expected = choose_vectors(Artifact(model=model, spec={}, masks=masks or {}), ctx,
                                      "auto", set())
    return chosen, expected, logged


def test_vector_choice_keeps_only_what_leaves_predictions_unchanged():
    """A classifier decided mostly by its bias: a 4-bit codebook merges close biases (argmax
    changes), so the stage must pick a finer coding; the decoded predictions stay the same."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 400)  # a codebook pays for 400 values (not for 40)
    with torch.no_grad():
        model.weight.mul_(0.02)
        model.bias.copy_(torch.linspace(0, 1, 400)[torch.randperm(400)])
    x = torch.randn(256, 8)
    y = model(x).argmax(1)
    chosen, expected, logged = _choose(model, x, y)
    assert logged["vectors_considered"] == 1
    assert logged["vectors_cb4_decision_flips"] > 0.002  # the coarsest level was tried, refused
    assert chosen.get("bias", "fp32") != "cb4" and set(expected) == set(chosen)
    with torch.no_grad():
        decoded = torch.nn.functional.linear(x, model.weight, expected.get("bias", model.bias))
    flips = (decoded.argmax(1) != y).float().mean().item()
    assert flips <= 0.002


def test_vector_choice_decides_per_tensor_when_no_level_passes_for_all():
    """One vector decides near-ties (every coding of it flips predictions), the other has 16
    distinct values (a 4-bit codebook holds it exactly): no level passes for both at once, so
    the choice goes tensor by tensor and codes the harmless one instead of leaving both float32."""
    import torch

    class TwoVectors(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(8, 400)
            self.offset = torch.nn.Parameter(torch.arange(400).remainder(16).float() / 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) + self.offset

    torch.manual_seed(0)
    model = TwoVectors()
    with torch.no_grad():
        model.linear.weight.mul_(0.02)
        model.linear.bias.copy_(torch.linspace(0, 1, 400)[torch.randperm(400)]
                                + 1e-4 * torch.randn(400))
    x = torch.randn(1024, 8)
    y = model(x).argmax(1)
    chosen, expected, logged = _choose(model, x, y, batch=256)
    assert logged["vectors_fp16_decision_flips"] > 0.002  # even the finest level, all at once
    assert chosen == {"offset": "cb4"} and set(expected) == {"offset"}
    assert torch.equal(expected["offset"], model.offset.detach())  # held exactly
    assert logged["vectors_fp32"] == 1 and logged["vectors_cb4"] == 1
    assert logged["vectors_greedy_evaluations"] == 5  # 4 codings of the bias, 1 of the offset
    assert torch.equal(model(x).argmax(1), y)  # the model is left as it came


def test_coding_a_coded_vector_again_changes_nothing():
    # the huffman stage writes the chosen (coded) vectors into the model, then encodes the
    # model: with 100 values and 16 centroids, quantile starts used to merge some of them
    x = np.random.default_rng(0).normal(size=100).astype(np.float32)
    once, _ = encode_vector(x, "cb4")
    twice, _ = encode_vector(once, "cb4")
    assert np.array_equal(once, twice) and np.unique(once).size <= 16


def test_a_pruned_vector_is_not_given_a_codebook():
    """A codebook need not hold an exact zero: a vector with a pruning mask stays as it is."""
    import torch

    model = torch.nn.Linear(8, 400)
    mask = torch.rand(400, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        model.bias.mul_(mask)
    x = torch.randn(64, 8)
    chosen, expected, _ = _choose(model, x, model(x).argmax(1), masks={"bias": mask})
    assert "bias" not in chosen and "bias" not in expected
