"""huffman after ptq: the .cpz holds the int8 ONNX model and decodes to that file, byte for byte.

One pipeline (dense -> magnitude prune -> static ptq -> huffman -> export) is shared by the tests;
its numbers are the runner's, measured on the files reloaded from disk.
"""

from __future__ import annotations

import json
import zlib

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_pipeline
from onnx import numpy_helper

import compresspipe
import compresspipe.formats.cpz_model
from compresspipe.cli import main as cli_main
from compresspipe.compress.quant.conv_taps import apply_window, recorded_windows
from compresspipe.compress.quant.onnx_int8 import INT8_FILE, OnnxModel
from compresspipe.compress.quant.pt2e import example_batch
from compresspipe.core.config import DataConfig
from compresspipe.core.data import build_data
from compresspipe.core.errors import ArtifactError, ConfigError
from compresspipe.formats import Int8Tensor, encode_raw, encode_tensor, read_cpz, write_cpz
from compresspipe.formats.cpz_model import CPZ_FILE, ONNX_KEY, read_model_cpz, read_onnx_cpz
from compresspipe.pipeline.loader import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8cpz") / "out"
    cfg = tiny_pipeline(out, epochs=2, tracking={"enabled": False})
    cfg["stages"] = [
        {"name": "dense", "train": {"epochs": 2, "lr": 0.05, "warmup_epochs": 0.5}},
        {"name": "prune", "prune": {"sparsity": 0.8, "train": {"epochs": 1, "lr": 0.02}}},
        {"name": "ptq", "ptq": {"calibration_batches": 2, "latency_repeats": 0}},
        {"name": "huffman", "huffman": {}},
        {"name": "export", "export": {"log_model": False}},
    ]
    summary = compresspipe.run(cfg)
    return out, {r["name"]: r for r in summary["stages"]}


def _masks(out):
    return compresspipe.load(out / "ptq").masks


def test_cpz_is_the_measured_int8_deployable(run):
    out, rec = run
    huff, ptq = rec["huffman"]["metrics"], rec["ptq"]["metrics"]
    assert rec["huffman"]["model_files"] == [CPZ_FILE]
    assert huff["model_bytes"] == (out / "huffman" / CPZ_FILE).stat().st_size
    assert ptq["model_bytes"] == (out / "ptq" / INT8_FILE).stat().st_size
    # 80% of the weights pruned: their zero codes become positions, the rest Huffman-coded
    # (measured: 104,086 vs 184,005 bytes; the int8 file keeps only the convolution taps that
    # read the input at 16x16, which were mostly pruned zeros)
    assert huff["model_bytes"] < 0.6 * ptq["model_bytes"]
    # the runner evaluated the decoded int8 model: exactly the ptq stage's predictions
    assert huff["test_top1"] == ptq["test_top1"]
    assert huff["test_loss"] == ptq["test_loss"]


def test_decodes_to_the_int8_file_byte_for_byte(run):
    out, _ = run
    data, name = read_onnx_cpz(out / "huffman" / CPZ_FILE)
    assert name == INT8_FILE
    assert data == (out / "ptq" / INT8_FILE).read_bytes()
    model = compresspipe.load(out / "huffman" / CPZ_FILE).model
    assert isinstance(model, OnnxModel)
    x = example_batch(build_data(DataConfig(name="digits", image_size=16)).test, 32)
    assert torch.equal(model(x), OnnxModel(out / "ptq" / INT8_FILE)(x))


def test_int8_weights_are_coded_with_pruned_zero_codes(run):
    out, _ = run
    tensors, metadata = read_cpz(out / "huffman" / CPZ_FILE)
    masks = _masks(out)
    assert masks
    int8 = {n: t for n, t in tensors.items() if isinstance(t, Int8Tensor)}
    assert set(masks) <= set(int8)
    assert all(metadata["encoding"][n].startswith("int8") for n in int8)
    proto = onnx.load(str(out / "ptq" / INT8_FILE))
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    windows = recorded_windows(proto)
    assert windows  # some convolutions run on 1x1 maps: their padding-only taps are gone
    for name, mask in masks.items():
        t = int8[name]
        assert np.array_equal(t.q, init[name])  # lossless
        zero = np.broadcast_to(t.zero_point.reshape(-1, *[1] * (t.q.ndim - 1)), t.q.shape)
        keep = apply_window(mask.numpy(), windows.get(name))
        assert np.array_equal(t.q[~keep], zero[~keep])
        # the scale is the one the graph dequantizes with
        dq = next(n for n in proto.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] == name)
        assert np.array_equal(t.scale, init[dq.input[1]])


def _rewrite(src, dest, **replace):
    """Copy a .cpz with some of its tensors replaced (None: dropped)."""
    tensors, metadata = read_cpz(src)
    coded = {n: encode_tensor(t) for n, t in tensors.items()}
    for name, value in replace.items():
        if value is None:
            coded.pop(name)
        else:
            coded[name] = value
    write_cpz(dest, coded, metadata)
    return dest


def test_hostile_skeleton_and_tensors_give_one_clear_error(run, tmp_path, monkeypatch):
    out, _ = run
    # a small cap stands in for the real one (256 MiB) without inflating that much here
    monkeypatch.setattr(compresspipe.formats.cpz_model, "MAX_GRAPH_BYTES", 1 << 20)
    src = out / "huffman" / CPZ_FILE
    graph = read_cpz(src)[1][ONNX_KEY]["graph"]

    def raw(data: bytes):
        return encode_raw(np.frombuffer(data, np.uint8))

    cases = {
        "not zlib": (raw(b"\x00garbage"), "does not parse as an ONNX model"),
        "not protobuf": (raw(zlib.compress(b"\xff" * 16)), "does not parse as an ONNX model"),
        "bomb": (raw(zlib.compress(bytes(2 << 20))), "at most 1048576 bytes"),
    }
    for label, (value, message) in cases.items():
        bad = _rewrite(src, tmp_path / f"{label.replace(' ', '_')}.cpz", **{graph: value})
        with pytest.raises(ArtifactError, match=message):
            read_model_cpz(bad)

    tensors, _ = read_cpz(src)
    dropped = _rewrite(src, tmp_path / "dropped.cpz", **{"fc.weight": None})
    with pytest.raises(ArtifactError, match="'fc.weight' is missing from the file"):
        read_model_cpz(dropped)
    extra = _rewrite(src, tmp_path / "extra.cpz", **{"fc.weight.x": encode_tensor(tensors["fc.weight"])})
    with pytest.raises(ArtifactError, match="'fc.weight.x' is not an initializer"):
        read_model_cpz(extra)
    q = tensors["fc.weight"].q
    shaped = _rewrite(src, tmp_path / "shape.cpz", **{"fc.weight": encode_raw(q.reshape(-1))})
    with pytest.raises(ArtifactError, match="'fc.weight' is int8 .* the ONNX graph expects"):
        read_model_cpz(shaped)
    typed = _rewrite(src, tmp_path / "dtype.cpz", **{"fc.weight": encode_raw(q.astype(np.int16))})
    with pytest.raises(ArtifactError, match="'fc.weight' is int16"):
        read_model_cpz(typed)


def test_decompress_writes_the_onnx_file(run, tmp_path, capsys):
    out, _ = run
    src = str(out / "huffman" / CPZ_FILE)
    assert cli_main(["decompress", src, "-o", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").read_bytes() == (out / "ptq" / INT8_FILE).read_bytes()
    assert cli_main(["decompress", src, "-o", str(tmp_path / "m.safetensors")]) != 0
    assert "holds an int8 ONNX model (model.int8.onnx)" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_export_after_int8_huffman_emits_the_cpz_and_the_int8_file(run):
    out, rec = run
    manifest = json.loads((out / "export" / "export.json").read_text())
    deployed = rec["huffman"]["metrics"]["test_top1"]
    masks = len(_masks(out))
    assert manifest["deployed_format"] == "cpz"
    for fmt, file in (("cpz", CPZ_FILE), ("onnx", INT8_FILE)):
        item = manifest["formats"][fmt]
        assert item["file"] == file and item["holds"] == "deployed model"
        assert item["verified"] and item["top1"] == deployed  # decoded in a fresh process
        assert item["masked_tensors_checked"] == masks
    assert "onnxruntime" in manifest["formats"]["cpz"]["imported_by_consumer"]
    files = out / "export"
    assert (files / CPZ_FILE).read_bytes() == (out / "huffman" / CPZ_FILE).read_bytes()
    assert (files / INT8_FILE).read_bytes() == (out / "ptq" / INT8_FILE).read_bytes()
    assert rec["export"]["metrics"]["model_bytes"] == rec["huffman"]["metrics"]["model_bytes"]


def test_float16_after_ptq_is_refused_before_running(tmp_path):
    cfg = tiny_pipeline(tmp_path / "out")
    cfg["stages"] = [{"name": "ptq", "ptq": {}},
                     {"name": "huffman", "huffman": {"float_dtype": "float16"}}]
    with pytest.raises(ConfigError, match="huffman.float_dtype: the int8 ONNX model of stage "
                       "'ptq' is coded losslessly"):
        load_pipeline(cfg)
