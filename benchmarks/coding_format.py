"""The .cpz container before and after format version 2, on the same clustered model.

Takes a pipeline's cluster-stage artifact (prune -> cluster on digits), folds BatchNorm as the
huffman stage does, and writes the same model
  (a) as format version 1 (JSON section table, raw float32 vectors: the file before this change),
  (b) as version 2 with float32 vectors (binary table, compressed metadata),
  (c) as version 2 with the vectors the huffman stage chooses (validation data when the data has
      a split, else the training data; never the test set),
then reports the bytes of every part, the container overhead, each stream's bits per symbol
against its order-0 entropy, and the test top-1/loss of the model decoded from each file
(reported, not used for any decision).

    .venv/bin/python benchmarks/coding_format.py PIPELINE.yaml RUN_DIR [--cluster-stage cluster]

RUN_DIR is the output directory of a run of PIPELINE.yaml (its data section is read). Saves
benchmarks/results/coding_format.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compresspipe.compress.quant.batchnorm import STATISTICS, fold_statistics  # noqa: E402
from compresspipe.core import artifact_keys  # noqa: E402
from compresspipe.core.artifact import Artifact  # noqa: E402
from compresspipe.core.data import build_data  # noqa: E402
from compresspipe.core.measure import evaluate  # noqa: E402
from compresspipe.formats import (  # noqa: E402
    coding_summary,
    container_parts,
    cpz,
    inspect_cpz,
    pack_cpz,
)
from compresspipe.formats.cpz_model import encode_state, model_metadata, read_model_cpz  # noqa: E402
from compresspipe.pipeline.loader import load_pipeline  # noqa: E402
from compresspipe.stages.vector_choice import choose_vectors  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def stream_rates(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Bits per symbol of each stream kind against the sum of per-tensor order-0 bounds."""
    out = {}
    for stream in ("positions", "values"):
        coded = [r for r in rows if r[f"{stream}_symbols"]]
        symbols = sum(r[f"{stream}_symbols"] for r in coded)
        if symbols:
            bits = 8 * sum(r[f"{stream}_bytes"] for r in coded)
            bound = sum(r[f"{stream}_entropy_bits"] for r in coded)
            out[stream] = {"symbols": symbols, "bits_per_symbol": bits / symbols,
                           "entropy_bits_per_symbol": bound / symbols,
                           "excess": bits / bound - 1 if bound else 0.0}
    return out


def measure(data: bytes, name: str, workdir: Path, test_loader) -> dict:
    path = workdir / f"{name}.cpz"
    path.write_bytes(data)
    rows = inspect_cpz(path)
    parts = container_parts(path, rows)
    decoded = read_model_cpz(path).model
    return {"bytes": len(data), "parts": parts,
            "overhead_fraction": parts["overhead"] / len(data),
            "container_fraction": (parts["overhead"] - parts["code_tables"]) / len(data),
            "streams": stream_rates(rows), "summary": coding_summary(rows),
            "test": evaluate(decoded, test_loader)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--cluster-stage", default="cluster")
    args = parser.parse_args()
    pipeline = load_pipeline(args.pipeline, check_model=False)
    torch.manual_seed(0)
    artifact = Artifact.load(args.run_dir / args.cluster_stage)
    model = artifact.model.eval()
    folded = fold_statistics(model, skip=set(artifact_keys.cluster_layers(artifact)))
    bundle = build_data(pipeline.config.data)
    logged: dict = {}
    ctx = SimpleNamespace(data=bundle, device=torch.device("cpu"), seed=0,
                          log_metrics=lambda m, step: logged.update(m))
    omitted = {f"{bn}.{s}" for bn in folded for s in STATISTICS}
    vectors, _ = choose_vectors(artifact, ctx, "auto", omitted)
    files = {}
    for name, version, vec in (("v1_raw_vectors", cpz.JSON_VERSION, None),
                               ("v2_raw_vectors", cpz.VERSION, None),
                               ("v2_coded_vectors", cpz.VERSION, vectors)):
        tensors, how = encode_state(artifact, "float32", folded, vec)
        files[name] = pack_cpz(tensors, model_metadata(artifact, how, folded), version=version)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"run_dir": str(args.run_dir), "model": pipeline.config.model.name,
                  "vector_choice": {"per_tensor": vectors, "decision": logged},
                  "files": {k: measure(v, k, Path(tmp), bundle.test_loader())
                            for k, v in files.items()}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coding_format.json").write_text(json.dumps(result, indent=1))
    for name, r in result["files"].items():
        print(f"{name:<18} {r['bytes']:>9,} B  overhead {r['overhead_fraction']:.2%} "
              f"(container {r['container_fraction']:.2%})  test top1 {r['test']['top1']:.2f} "
              f"loss {r['test']['loss']:.4f}")
        for key, v in r["parts"].items():
            print(f"    {key:<24} {v:>9,}")
        for stream, s in r["streams"].items():
            print(f"    {stream}: {s['bits_per_symbol']:.3f} bits/symbol, order-0 bound "
                  f"{s['entropy_bits_per_symbol']:.3f} (+{s['excess']:.1%})")
    print("vector decision:", json.dumps(logged))


if __name__ == "__main__":
    main()
