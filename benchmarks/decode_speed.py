"""Decode speed of the .cpz Huffman decoder and the time to load a resnet18 .cpz into a model.

On the quickstart's own file (resnet18, lottery ticket, 4-bit sharing; the pipeline is run into
--workdir first unless --cpz names a file):
  * Huffman decoding alone: every coded stream of the file through ``huffman.decode_many`` (what
    the reader does), coded symbols per second;
  * the whole reader (``unpack_cpz``: checks, decoding, scattering values to positions);
  * ``read_model_cpz`` in a fresh process: the seconds of the call itself (cold: the first call
    in the process, after ``import torch, timm``) and the process's wall time with the imports.
Repetitions are interleaved and the median and minimum reported. Every time is measured twice:
wall clock, and CPU time of the decoding thread (``time.thread_time``; numpy runs on that one
thread), because on a shared machine the wall clock measures the queue for a core as much as the
decoder; the load average at the start is saved beside them. Targets: >= 30 M symbols/s, load
<= 1 s.

    .venv/bin/python benchmarks/decode_speed.py [--cpz FILE] [--repeats 7]

Saves benchmarks/results/decode_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compresspipe.formats import huffman  # noqa: E402
from compresspipe.formats.cpz.decode import _read_entry, unpack_cpz  # noqa: E402
from compresspipe.formats.cpz.parse import parse  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET_SYMBOLS_PER_S = 30e6
TARGET_LOAD_S = 1.0
FRESH = """
import sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(1)
import timm
from compresspipe.formats.cpz_model import read_model_cpz
t1, c1 = time.perf_counter(), time.thread_time()
read_model_cpz(sys.argv[1])
print(time.perf_counter() - t1, time.thread_time() - c1)
"""


def stream_args(data: bytes) -> list[tuple]:
    """decode_many's arguments for every Huffman stream of the file, as the reader builds them."""
    parsed = parse(data, 1 << 34)
    return [job.args for e in parsed.entries for job in _read_entry(e, parsed.payload).jobs]


def fresh_load(path: Path) -> tuple[float, float, float]:
    """(wall and CPU seconds of read_model_cpz, wall seconds of the whole process) in a new
    interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", FRESH, str(path)], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]), time.perf_counter() - started


def timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``."""
    started, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - started, time.thread_time() - cpu


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "all": times}


def both(pairs: list[tuple[float, float]]) -> dict:
    return {"wall": summary([w for w, _ in pairs]), "cpu": summary([c for _, c in pairs])}


def measure(path: Path, repeats: int) -> dict:
    data = path.read_bytes()
    args = stream_args(data)
    symbols = int(sum(a[2] for a in args))
    load_average = os.getloadavg()[0]
    huffman.decode_many(args)  # warm-up: imports, caches
    unpack_cpz(data)
    decode_t, reader_t, load_t, process_t = [], [], [], []
    for _ in range(repeats):  # interleaved, so that load on the shared machine hits all alike
        decode_t.append(timed(lambda: huffman.decode_many(args)))
        reader_t.append(timed(lambda: unpack_cpz(data)))
        wall, cpu, process = fresh_load(path)
        load_t.append((wall, cpu))
        process_t.append(process)
    decode, reader, load = both(decode_t), both(reader_t), both(load_t)
    rate = {k: symbols / decode[k]["median"] for k in ("wall", "cpu")}
    return {
        "cpz": str(path), "bytes": len(data), "streams": len(args), "coded_symbols": symbols,
        "blocks": int(sum(np.asarray(a[3]).size - 1 for a in args)),
        "load_average_1min": load_average,
        "huffman_decode_seconds": decode, "reader_seconds": reader,
        "fresh_process_load_seconds": load, "fresh_process_wall_seconds": summary(process_t),
        "decode_symbols_per_second": rate,
        "reader_symbols_per_second": {k: symbols / reader[k]["median"] for k in ("wall", "cpu")},
        "targets": {"decode_symbols_per_second": TARGET_SYMBOLS_PER_S,
                    "load_seconds": TARGET_LOAD_S,
                    "decode_met": {k: v >= TARGET_SYMBOLS_PER_S for k, v in rate.items()},
                    "load_met": {k: load[k]["median"] <= TARGET_LOAD_S for k in load}},
    }


def markdown(r: dict) -> str:
    t, n = r["targets"], r["coded_symbols"]
    ok = {True: "met", False: "missed"}

    def rate(key: str, clock: str) -> str:
        s = r[key][clock]
        return f"{n / s['median'] / 1e6:.1f} M/s (best {n / s['min'] / 1e6:.1f})"

    load, proc = r["fresh_process_load_seconds"], r["fresh_process_wall_seconds"]
    return "\n".join([
        f"# .cpz decode speed and load time ({r['date']}, {r['machine']})", "",
        f"Shared machine: 1-minute load average {r['load_average_1min']:.1f} at the start; medians "
        "of interleaved repetitions. Wall clock includes waiting for a core; CPU is the decoding "
        f"thread's CPU time. `{r['cpz']}`: {r['bytes']:,} B, {r['streams']} Huffman streams, "
        f"{r['blocks']} blocks, {n:,} coded symbols.", "",
        "| measure | wall clock | CPU time | target |", "|---|---:|---:|---|",
        f"| Huffman decode, all streams (symbols/s) | {rate('huffman_decode_seconds', 'wall')} | "
        f"{rate('huffman_decode_seconds', 'cpu')} | >= 30 M/s: wall **{ok[t['decode_met']['wall']]}**"
        f", CPU **{ok[t['decode_met']['cpu']]}** |",
        f"| whole reader, unpack_cpz (symbols/s) | {rate('reader_seconds', 'wall')} | "
        f"{rate('reader_seconds', 'cpu')} | |",
        f"| read_model_cpz, fresh process, cold (s) | {load['wall']['median']:.3f} | "
        f"{load['cpu']['median']:.3f} | <= 1 s: wall **{ok[t['load_met']['wall']]}**, CPU "
        f"**{ok[t['load_met']['cpu']]}** |",
        f"| that whole process with imports (s) | {proc['median']:.2f} | | |", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpz", type=Path, help="a resnet18 .cpz (default: run the quickstart)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cpz_speed")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    path = args.cpz
    if path is None:
        import compresspipe  # lazy: only a run without --cpz trains the quickstart

        out = args.workdir / "quickstart"
        compresspipe.run(ROOT / "pipelines" / "quickstart.yaml", [f"output_dir={out}"],
                         resume=True)
        path = out / "huffman" / "model.cpz"
    result = measure(path, args.repeats)
    result.update(date=time.strftime("%Y-%m-%d"),
                  machine=f"{platform.machine()}, {os.cpu_count()} CPUs, 1 thread")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_speed.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "decode_speed.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
