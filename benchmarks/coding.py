"""The .cpz coder end to end: real pipelines on digits, and a resnet18-sized synthetic model.

(a) The quickstart pipeline as shipped (resnet18: dense -> IMP 97% in 3 rounds -> 4-bit weight
    sharing -> huffman) and the same chain pushed to 98% sparsity, run by compresspipe itself:
    the .cpz bytes against the fp32 safetensors file of the same model, the accuracy of the
    model decoded from the .cpz against the dense one, and the byte breakdown of the file.
(b) A resnet18-sized model (11.7M weights, 90% pruned, 16 clusters; benchmarks/coding_codec.py):
    bits per symbol against the Shannon bound, zlib's Huffman-only mode and zstd -19; decode
    throughput against dahuffman (pure Python) and zlib; the time to load the .cpz into a
    runnable timm resnet18.

    .venv/bin/python benchmarks/coding.py [--workdir DIR] [--skip-pipelines]

Saves benchmarks/results/coding.json and coding.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import coding_codec  # noqa: E402

from compresspipe.formats import cpz

RESULTS = Path(__file__).resolve().parent / "results"
PIPELINES = {
    "quickstart (97%, 4-bit)": [],
    "quickstart at 98%": ["stages.1.prune.sparsity=0.98"],
}
DAHUFFMAN_SYMBOLS = 200_000  # pure Python: ~0.1 s per 200k symbols


def byte_breakdown(stats: list[dict], total: int) -> dict[str, int]:
    """Where the bytes of a .cpz go: coded positions, coded values, code tables, raw tensors."""
    s = cpz.coding_summary(stats)
    parts = {"positions": s["positions_bytes"], "values": s["values_bytes"],
             "tables": s["table_bytes"], "raw tensors": s["raw_bytes"]}
    parts["container (headers, metadata, checksums)"] = total - sum(parts.values())
    return parts


def stream_bounds(stats: list[dict]) -> dict[str, dict[str, float]]:
    """Bits per symbol of each coded stream kind against its per-tensor Shannon bound."""
    out = {}
    for stream in ("positions", "values"):
        rows = [s for s in stats if s[f"{stream}_symbols"] and s[f"{stream}_entropy_bits"]]
        if rows:
            out[stream] = coding_codec.stream_report(rows, stream)
    return out


def run_pipeline(name: str, overrides: list[str], workdir: Path) -> dict:
    import compresspipe
    from compresspipe.cli import quickstart_path
    from compresspipe.formats.cpz_model import read_model_cpz

    out = workdir / name.split(" ")[0] / str(len(overrides))
    started = time.perf_counter()
    summary = compresspipe.run(quickstart_path(), overrides=[f"output_dir={out}", *overrides],
                               resume=True)
    stages = {s["name"]: s["metrics"] for s in summary["stages"]}
    path = out / "huffman" / "model.cpz"
    data = path.read_bytes()
    stats = cpz.inspect_cpz(data)
    load_s = coding_codec.best_time(lambda: read_model_cpz(path), repeats=3)
    fp32 = stages["input"]["model_bytes"]
    return {
        "pipeline": name, "overrides": overrides, "minutes": (time.perf_counter() - started) / 60,
        "fp32_bytes": fp32, "cpz_bytes": len(data), "ratio": fp32 / len(data),
        "dense_top1": stages["dense"]["test_top1"], "dense_loss": stages["dense"]["test_loss"],
        "cpz_top1": stages["huffman"]["test_top1"], "cpz_loss": stages["huffman"]["test_loss"],
        "top1_drop": stages["dense"]["test_top1"] - stages["huffman"]["test_top1"],
        "sparsity": stages["huffman"].get("masked_sparsity"),
        "breakdown": byte_breakdown(stats, len(data)), "streams": stream_bounds(stats),
        "load_seconds": load_s,
    }


def synthetic_resnet18() -> dict:
    """coding_codec's model plus zstd/dahuffman baselines and a load into a runnable model."""
    import dahuffman

    from compresspipe.formats.cpz_model import read_model_cpz

    rng = np.random.default_rng(coding_codec.SEED)
    model = coding_codec.model_benchmark(rng)
    encodings, dense, _, weights = coding_codec.build_model(np.random.default_rng(coding_codec.SEED))
    values = np.concatenate([d[d > 0] for d in dense.values()]).astype(np.uint8)

    sample = values[:DAHUFFMAN_SYMBOLS]
    codec = dahuffman.HuffmanCodec.from_data(sample.tolist())
    coded = codec.encode(sample.tolist())
    dah_s = coding_codec.best_time(lambda: codec.decode(coded), repeats=2)
    raw = values.tobytes()
    z = zlib.compress(raw, 9)
    zh = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    zh = zh.compress(raw) + zh.flush()
    stream = cpz.HuffmanStream.from_symbols(values - 1, coding_codec.CLUSTERS, 1)
    ours_s = coding_codec.best_time(stream.decode)
    throughput = {
        "symbols": int(values.size),
        "cpz_decode_symbols_per_second": values.size / ours_s,
        "dahuffman_decode_symbols_per_second": sample.size / dah_s,
        "zlib9_decompress_symbols_per_second": values.size / coding_codec.best_time(
            lambda: zlib.decompress(z)),
        "zlib_huffman_only_decompress_symbols_per_second": values.size / coding_codec.best_time(
            lambda: zlib.decompress(zh)),
    }
    # the same tensors under timm resnet18's names: a file compresspipe.load turns into a model
    bns = sorted({n.rsplit(".", 1)[0] for n in encodings if n.endswith(".bias") and "fc" not in n})
    meta = {"spec": {"source": "timm", "name": "resnet18", "kwargs": {}}, "bn_folded": bns}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet18.cpz"
        path.write_bytes(cpz.pack_cpz(encodings, meta))
        load_s = coding_codec.best_time(lambda: read_model_cpz(path), repeats=3)
        runnable = read_model_cpz(path).model
        import torch

        with torch.no_grad():
            assert runnable(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    return {"model": model, "throughput": throughput, "load_seconds": load_s,
            "weights": weights}


def markdown(result: dict) -> str:
    lines = [f"# .cpz coding benchmark ({result['date']}, {result['machine']})", ""]
    if result["pipelines"]:
        lines += ["## End to end on digits (resnet18, 32x32; accuracy of the decoded .cpz model)", "",
                  "| pipeline | fp32 file | .cpz | ratio | sparsity | dense top-1 / loss | "
                  ".cpz top-1 / loss | drop (pt) | load s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in result["pipelines"]:
            lines.append(
                f"| {p['pipeline']} | {p['fp32_bytes']:,} | {p['cpz_bytes']:,} | **{p['ratio']:.1f}x** | "
                f"{p['sparsity']:.1%} | {p['dense_top1']:.2f} / {p['dense_loss']:.3f} | "
                f"{p['cpz_top1']:.2f} / {p['cpz_loss']:.3f} | {p['top1_drop']:.2f} | {p['load_seconds']:.2f} |")
        lines += ["", "Byte breakdown of each .cpz:", "",
                  "| pipeline | " + " | ".join(result["pipelines"][0]["breakdown"]) + " |",
                  "|---|" + "---:|" * len(result["pipelines"][0]["breakdown"])]
        for p in result["pipelines"]:
            lines.append(f"| {p['pipeline']} | " + " | ".join(
                f"{v:,} ({v / p['cpz_bytes']:.0%})" for v in p["breakdown"].values()) + " |")
        lines += ["", "| pipeline | stream | symbols | bits/symbol | entropy bound | ratio |",
                  "|---|---|---:|---:|---:|---:|"]
        for p in result["pipelines"]:
            for stream, r in p["streams"].items():
                lines.append(f"| {p['pipeline']} | {stream} | {r['symbols']:,} | "
                             f"{r['bits_per_symbol']:.4f} | {r['entropy_bits_per_symbol']:.4f} | "
                             f"{r['ratio_to_entropy']:.4f} |")
    s = result["synthetic"]
    m, t, b = s["model"], s["throughput"], s["model"]["baselines_bytes"]
    lines += ["", f"## resnet18-sized synthetic model ({m['weights']:,} weights, 90% pruned, 16 clusters)",
              "", f".cpz {m['cpz_bytes']:,} B vs fp32 {m['fp32_bytes']:,} B = **{m['compression_vs_fp32']:.1f}x** "
              f"({m['bits_per_weight']:.3f} bits/weight); loads into a runnable timm resnet18 in "
              f"**{s['load_seconds']:.2f} s**.", "",
              "| stream | .cpz bits/symbol | entropy | ratio | .cpz bytes | zlib huffman-only | zstd -19 | zlib -9 |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for stream in ("positions", "values"):
        r, z = m[f"{stream}_stream"], b[f"{stream}_stream"]
        lines.append(f"| {stream} | {r['bits_per_symbol']:.4f} | {r['entropy_bits_per_symbol']:.4f} | "
                     f"{r['ratio_to_entropy']:.4f} | {b[f'cpz_{stream}_stream']:,} | "
                     f"{z['zlib_huffman_only']:,} | {z.get('zstd19', 'n/a'):,} | {z['zlib9']:,} |")
    lines += ["", f"All streams with code and block tables: {m['ratio_to_entropy_with_tables']:.4f}x "
              "the entropy bound.", "",
              f"Decode throughput ({t['symbols']:,} cluster-index symbols):", "",
              "| decoder | M symbols/s |", "|---|---:|",
              f"| .cpz (numpy, vectorized) | {t['cpz_decode_symbols_per_second'] / 1e6:.1f} |",
              f"| dahuffman (pure Python) | {t['dahuffman_decode_symbols_per_second'] / 1e6:.2f} |",
              f"| zlib -9 decompress | {t['zlib9_decompress_symbols_per_second'] / 1e6:.1f} |",
              f"| zlib huffman-only decompress | {t['zlib_huffman_only_decompress_symbols_per_second'] / 1e6:.1f} |",
              f"| whole .cpz read (positions + values + tables) | {m['read_symbols_per_second'] / 1e6:.1f} |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="keep (and resume) pipeline runs here")
    ap.add_argument("--skip-pipelines", action="store_true", help="only the synthetic model")
    args = ap.parse_args()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
              f"{__import__('os').cpu_count()} cpus", "pipelines": []}
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        if not args.skip_pipelines:
            for name, overrides in PIPELINES.items():
                result["pipelines"].append(run_pipeline(name, overrides, workdir))
        result["synthetic"] = synthetic_resnet18()
    text = markdown(result)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "coding.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    (RESULTS / "coding.md").write_text(text)


if __name__ == "__main__":
    main()
