"""NNCodec side of benchmarks/coding_vs_nnc.py; runs in the baseline venv (`make nnc-venv`).

nncodec needs numpy<2 and our venv pins numpy 2, so this script lives in its own venv and
talks to the benchmark through files only (no pickle in either direction):

    .venv-nnc/bin/python benchmarks/baselines/nnc_worker.py JOBDIR

JOBDIR/jobs.json lists jobs ``{"id", "input", "qp", "use_dq", "codebook"}``; ``input`` names a
safetensors file in JOBDIR holding float32 tensors. Each job is encoded by NNCodec
(``nnc.compress``: DeepCABAC, uniform or codebook quantization), the bitstream is written to
JOBDIR/<id>.nnc and measured on disk, decoded from that file (``nnc.decompress``), and the
decoded tensors are written to JOBDIR/<id>.decoded.safetensors. JOBDIR/results.json gets the
bytes, encode and decode seconds, and the versions of nncodec, numpy and torch. Imports
nothing from compresspipe.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from nncodec import nnc
from safetensors.numpy import load_file, save_file


def run_job(jobdir: Path, job: dict, params: dict[str, np.ndarray]) -> dict:
    """Encode ``params`` as the job asks, decode the written file, save what came back."""
    bitstream = jobdir / f"{job['id']}.nnc"
    quiet = io.StringIO()  # nncodec prints progress even with verbose=False
    started = time.perf_counter()
    with contextlib.redirect_stdout(quiet):
        data = nnc.compress(dict(params), bitstream_path=str(bitstream), qp=int(job["qp"]),
                            use_dq=bool(job["use_dq"]), codebook_mode=2 if job["codebook"] else 0,
                            return_bitstream=True, verbose=False)
    encode_s = time.perf_counter() - started
    if not bitstream.exists():  # some releases only return the bitstream
        bitstream.write_bytes(bytes(data))
    started = time.perf_counter()
    with contextlib.redirect_stdout(quiet):
        decoded = nnc.decompress(str(bitstream), verbose=False)
    decode_s = time.perf_counter() - started
    missing = sorted(set(params) - set(decoded))
    if missing:
        raise SystemExit(f"job {job['id']}: NNCodec decoded no tensor {missing[0]!r}")
    out = {k: np.ascontiguousarray(np.asarray(decoded[k], dtype=np.float32).reshape(v.shape))
           for k, v in params.items()}
    save_file(out, str(jobdir / f"{job['id']}.decoded.safetensors"))
    return {"id": job["id"], "bytes": bitstream.stat().st_size, "encode_seconds": encode_s,
            "decode_seconds": decode_s}


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: nnc_worker.py JOBDIR")
    jobdir = Path(sys.argv[1])
    jobs = json.loads((jobdir / "jobs.json").read_text())
    inputs: dict[str, dict[str, np.ndarray]] = {}
    results = []
    for job in jobs:
        if job["input"] not in inputs:
            inputs[job["input"]] = load_file(str(jobdir / job["input"]))
        results.append(run_job(jobdir, job, inputs[job["input"]]))
        print(f"{job['id']}: {results[-1]['bytes']:,} B, encode {results[-1]['encode_seconds']:.1f} s,"
              f" decode {results[-1]['decode_seconds']:.1f} s", flush=True)
    versions = {p: metadata.version(p) for p in ("nncodec", "numpy", "torch", "safetensors")}
    (jobdir / "results.json").write_text(json.dumps({"versions": versions, "jobs": results},
                                                    indent=1))


if __name__ == "__main__":
    main()
