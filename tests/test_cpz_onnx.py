"""The ONNX-in-.cpz deployable: a pruned, clustered model written by compresspipe and run on a
"device" that has only numpy, onnxruntime and the one reader file (no torch, no compresspipe)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compresspipe.compress.quant.batchnorm import fold_statistics
from compresspipe.compress.quant.cluster import cluster_model, store
from compresspipe.core.artifact import Artifact
from compresspipe.formats import cpz_onnx_reader, inspect_cpz, write_cpz
from compresspipe.formats.cpz_onnx import onnx_cpz_tensors

DEVICE_SCRIPT = """
import json, sys
import numpy as np
for banned in ("torch", "compresspipe"):
    try:
        __import__(banned)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{banned} is importable on the device")
import cpz_onnx_reader
session = cpz_onnx_reader.inference_session(sys.argv[1])
x = np.load(sys.argv[2])
logits = session.run(None, {session.get_inputs()[0].name: x})[0]
np.save(sys.argv[3], logits)
print(json.dumps(sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in
                        ("torch", "compresspipe", "onnx", "cpz_onnx_reader"))))
"""


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("onnxcpz")
    # a small CNN built here: timm's import alone costs more than this whole test
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1, bias=False), torch.nn.BatchNorm2d(64),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    spec = {"source": "test", "name": "small_cnn"}
    with torch.no_grad():
        model.train()(torch.randn(32, 1, 16, 16))  # non-trivial BatchNorm statistics
    model.eval()
    weights = {n: p for n, p in model.named_parameters() if p.ndim > 1}
    masks = {n: (p.abs() >= p.abs().flatten().quantile(0.9)) for n, p in weights.items()}
    artifact = Artifact(model=model, spec=spec, masks=masks)
    store(artifact, cluster_model(model, dict.fromkeys(weights, 4), masks))
    fold_statistics(model, skip=set(weights))
    x = torch.randn(5, 1, 16, 16)
    path = out / "model.onnx.cpz"
    # the TorchScript exporter: seconds, where the dynamo one the export stage uses takes minutes
    torch.onnx.export(model, (x[:2],), str(out / "model.onnx"), dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    size = write_cpz(path, *onnx_cpz_tensors(artifact, out / "model.onnx"))
    with torch.no_grad():
        expected = model(x).numpy()
    return out, path, size, x.numpy(), expected, weights, masks


def test_weights_are_stored_clustered_and_sparse(written):
    _, path, size, _, _, weights, masks = written
    rows = {r["name"]: r for r in inspect_cpz(path)}
    assert size == path.stat().st_size
    for name in weights:
        assert rows[name]["kind"] == "clustered", name
        assert rows[name]["nonzero"] == int(masks[name].sum()) or rows[name]["positions_method"] \
            is None
    tensors, _ = cpz_onnx_reader.read_tensors(str(path))
    for name, w in weights.items():
        assert np.array_equal(tensors[name], w.detach().numpy()), name


def test_device_needs_neither_torch_nor_compresspipe(written):
    out, path, _, x, expected, _, _ = written
    device = out / "device"
    device.mkdir()
    shutil.copy(cpz_onnx_reader.__file__, device / "cpz_onnx_reader.py")
    site = Path(np.__file__).resolve().parents[1]
    for package in ("numpy", "numpy.libs", "onnxruntime"):  # nothing else from site-packages
        if (site / package).exists():
            os.symlink(site / package, device / package)
    np.save(out / "x.npy", x)
    # -I: no environment, no user site; -S: no site module, so no site-packages and none of its
    # .pth import hooks (an editable install of compresspipe is one): only the stdlib and device/
    script = f"import sys; sys.path.append({str(device)!r})\n" + DEVICE_SCRIPT
    result = subprocess.run([sys.executable, "-I", "-S", "-c", script, str(path), str(out / "x.npy"),
                             str(out / "y.npy")], capture_output=True, text=True, cwd=device,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == ["cpz_onnx_reader"]
    logits = np.load(out / "y.npy")
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
    assert np.allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_reader_errors_name_the_problem(written, tmp_path):
    _, path, _, _, _, _, _ = written
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    bad = tmp_path / "bad.cpz"
    bad.write_bytes(bytes(data))
    with pytest.raises(cpz_onnx_reader.CpzReadError, match="checksum"):
        cpz_onnx_reader.read_tensors(str(bad))
    data = bytearray(path.read_bytes())
    data[4:6] = b"\x01\x00"
    bad.write_bytes(bytes(data))
    with pytest.raises(cpz_onnx_reader.CpzReadError, match="version 1"):
        cpz_onnx_reader.read_tensors(str(bad))


def test_reader_matches_the_full_reader_on_every_coding():
    from compresspipe.formats import encode_clustered, encode_int8, encode_raw, read_cpz, write_cpz
    from compresspipe.formats.vectors import encode_vector

    rng = np.random.default_rng(3)
    book = np.concatenate([[0.0], np.linspace(-1, 1, 15)]).astype(np.float32)
    tensors = {}
    for i, density in enumerate((0.002, 0.05, 0.4, 1.0)):
        idx = np.where(rng.random((40, 16, 3, 3)) < density, rng.integers(1, 16, (40, 16, 3, 3)),
                       0).astype(np.uint8)
        tensors[f"w{i}"] = encode_clustered(idx, book)
    runs = np.zeros((64, 64), np.uint8)
    runs[::3, 5:40] = 7  # long runs: the runs method
    tensors["runs"] = encode_clustered(runs, book)
    q = rng.integers(-128, 128, (8, 50)).astype(np.int8)
    q[:, ::2] = 3
    tensors["q"] = encode_int8(q, rng.random(8).astype(np.float32), np.full(8, 3, np.int8), 0)
    tensors["half"] = encode_raw(rng.normal(size=9).astype(np.float16))
    for how in ("cb4", "cb6"):  # the huffman stage's coded 1-D tensors: a codebook, no zero
        tensors[f"vector_{how}"] = encode_vector(rng.normal(size=300).astype(np.float32), how)[1]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"reader-{os.getpid()}.cpz"
    try:
        write_cpz(path, tensors, {})
        methods = {r["name"]: r["positions_method"] for r in inspect_cpz(path)}
        assert {"relidx", "runs", None} <= set(methods.values())
        got, _ = cpz_onnx_reader.read_tensors(str(path))
        full, _ = read_cpz(path)
    finally:
        path.unlink(missing_ok=True)
    for name, t in full.items():
        want = t.q if name == "q" else t.array if name == "half" else t.to_dense()
        assert got[name].dtype == want.dtype and np.array_equal(got[name], want), name
