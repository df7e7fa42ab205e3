"""The ONNX-in-.cpz deployable on a real clustered model: its bytes next to model.cpz, and the
decode speed of the numpy-only device reader against compresspipe's own reader.

Takes a cluster-stage artifact, folds BatchNorm as the huffman stage does, writes model.cpz (the
huffman stage's file, float32 vectors) and model.onnx.cpz (ONNX graph, weights coded the same
way), then times (best of 5, interleaved; the machine is shared) compresspipe's read_cpz and
cpz_onnx_reader.read_tensors on model.onnx.cpz, and the onnxruntime session start from the
.cpz; the session's predictions are compared with the torch model on 64 digits.

    .venv/bin/python benchmarks/coding_onnx_reader.py STAGE_DIR

Saves benchmarks/results/coding_onnx_reader.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compresspipe.compress.quant.batchnorm import fold_statistics  # noqa: E402
from compresspipe.core import artifact_keys  # noqa: E402
from compresspipe.core.artifact import Artifact  # noqa: E402
from compresspipe.formats import cpz_onnx_reader, inspect_cpz, read_cpz  # noqa: E402
from compresspipe.formats.cpz_model import write_model_cpz  # noqa: E402
from compresspipe.formats.cpz_onnx import write_onnx_cpz  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def best(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage_dir", type=Path)
    args = parser.parse_args()
    artifact = Artifact.load(args.stage_dir)
    model = artifact.model.eval()
    folded = fold_statistics(model, skip=set(artifact_keys.cluster_layers(artifact)))
    x = torch.randn(64, *next(iter(model.parameters())).shape[1:2], 32, 32)
    with tempfile.TemporaryDirectory() as tmp:
        cpz_path, onnx_path = Path(tmp) / "model.cpz", Path(tmp) / "model.onnx.cpz"
        write_model_cpz(artifact, cpz_path, bn_folded=folded)
        start = time.perf_counter()
        write_onnx_cpz(artifact, x[:2], onnx_path)
        write_s = time.perf_counter() - start
        symbols = sum((r["positions_symbols"] or 0) + (r["values_symbols"] or 0)
                      for r in inspect_cpz(onnx_path))
        timings = {"compresspipe_read_cpz_s": [], "numpy_reader_s": [], "session_s": []}
        for _ in range(5):  # interleaved: the machine is shared
            timings["compresspipe_read_cpz_s"].append(best(lambda: read_cpz(onnx_path), 1))
            timings["numpy_reader_s"].append(
                best(lambda: cpz_onnx_reader.read_tensors(str(onnx_path)), 1))
            timings["session_s"].append(
                best(lambda: cpz_onnx_reader.inference_session(str(onnx_path)), 1))
        session = cpz_onnx_reader.inference_session(str(onnx_path))
        logits = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            expected = model(x).numpy()
        result = {
            "stage_dir": str(args.stage_dir),
            "model_cpz_bytes": cpz_path.stat().st_size,
            "onnx_cpz_bytes": onnx_path.stat().st_size,
            "onnx_cpz_write_s": write_s,
            "coded_symbols": symbols,
            **{k: min(v) for k, v in timings.items()},
            "numpy_reader_msymbols_per_s": symbols / min(timings["numpy_reader_s"]) / 1e6,
            "compresspipe_reader_msymbols_per_s":
                symbols / min(timings["compresspipe_read_cpz_s"]) / 1e6,
            "same_argmax": float(np.mean(logits.argmax(1) == expected.argmax(1))),
            "max_abs_logit_diff": float(np.abs(logits - expected).max()),
            "note": "best of 5 interleaved runs on a shared 2-core machine",
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coding_onnx_reader.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
