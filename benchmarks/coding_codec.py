"""Benchmark the .cpz entropy coder on a synthetic resnet18-sized pruned + clustered model.

Every conv/fc weight of resnet18 (11.7M weights) is drawn from a He-scaled Gaussian,
90% magnitude-pruned per layer and the survivors quantized to 16 linear centroids
(Deep Compression's linear initialization); BN parameters and the fc bias are stored raw.
Reports bits/symbol vs the Shannon bound per stream, zlib baselines, encode/decode
throughput and the total file size, and saves everything to
benchmarks/results/coding_codec.json.

Run: .venv/bin/python benchmarks/coding_codec.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compresspipe.formats import cpz, huffman

SEED = 0
SPARSITY = 0.9
CLUSTERS = 16
STREAM_SYMBOLS = 10_000_000
REPEATS = 5
RESULTS = Path(__file__).resolve().parent / "results" / "coding_codec.json"

try:  # optional third-party baseline
    import zstandard
except ImportError:  # pragma: no cover - depends on the environment
    zstandard = None


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """Weight shapes of torchvision's resnet18 (conv, downsample and fc weights, fc bias, BN)."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}
    bn: dict[str, int] = {"bn1": 64}
    cin = 64
    for layer, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{layer}.{block}"
            stride_in = cin if block == 0 else cout
            shapes[f"{prefix}.conv1.weight"] = (cout, stride_in, 3, 3)
            shapes[f"{prefix}.conv2.weight"] = (cout, cout, 3, 3)
            bn[f"{prefix}.bn1"] = bn[f"{prefix}.bn2"] = cout
            if block == 0 and layer > 1:
                shapes[f"{prefix}.downsample.0.weight"] = (cout, cin, 1, 1)
                bn[f"{prefix}.downsample.1"] = cout
        cin = cout
    shapes["fc.weight"] = (1000, 512)
    shapes["fc.bias"] = (1000,)
    for name, channels in bn.items():
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (channels,)
    return shapes


def prune_and_cluster(
    rng: np.random.Generator, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster indices (0 = pruned) and a codebook [0, c_1..c_16] for one weight tensor."""
    fan_in = int(np.prod(shape[1:]))
    w = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)
    keep = np.abs(w) > np.quantile(np.abs(w), SPARSITY)
    kept = w[keep]
    centroids = np.linspace(kept.min(), kept.max(), CLUSTERS, dtype=np.float32)
    # Nearest of evenly spaced centroids, computed arithmetically to avoid an (n, 16) temp.
    step = (centroids[-1] - centroids[0]) / (CLUSTERS - 1)
    nearest = np.clip(np.rint((kept - centroids[0]) / step), 0, CLUSTERS - 1).astype(np.uint8)
    indices = np.zeros(shape, dtype=np.uint8)
    indices[keep] = nearest + 1
    return indices, np.concatenate([[0.0], centroids]).astype(np.float32)


def build_model(rng: np.random.Generator) -> tuple[dict[str, cpz.TensorEncoding], dict, float, int]:
    """Encoded tensors, the dense indices (for baselines), encode seconds and weight count."""
    encodings: dict[str, cpz.TensorEncoding] = {}
    dense: dict[str, np.ndarray] = {}
    seconds = 0.0
    weights = 0
    for name, shape in resnet18_shapes().items():
        if len(shape) == 1:
            encodings[name] = cpz.encode_raw(rng.normal(size=shape).astype(np.float32))
            continue
        indices, book = prune_and_cluster(rng, shape)
        start = time.perf_counter()
        encodings[name] = cpz.encode_clustered(indices, book)
        seconds += time.perf_counter() - start
        dense[name] = indices
        weights += indices.size
    return encodings, dense, seconds, weights


def best_time(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Best wall time of ``repeats`` runs (after one warm-up) — the least noisy estimate."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def zlib_sizes(data: bytes) -> dict[str, int]:
    huff = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    sizes = {
        "zlib9": len(zlib.compress(data, 9)),
        "zlib_huffman_only": len(huff.compress(data) + huff.flush()),
    }
    if zstandard is not None:
        sizes["zstd19"] = len(zstandard.ZstdCompressor(level=19).compress(data))
    return sizes


def stream_report(stats: list[dict], stream: str) -> dict[str, float]:
    """Aggregate one stream kind over all Huffman-coded tensors."""
    rows = [s for s in stats if s[f"{stream}_symbols"]]
    symbols = sum(s[f"{stream}_symbols"] for s in rows)
    data_bits = 8 * sum(s[f"{stream}_bytes"] for s in rows)
    entropy = sum(s[f"{stream}_entropy_bits"] for s in rows)
    return {
        "tensors": len(rows),
        "symbols": symbols,
        "bits_per_symbol": data_bits / symbols,
        "entropy_bits_per_symbol": entropy / symbols,
        "ratio_to_entropy": data_bits / entropy,
    }


def model_benchmark(rng: np.random.Generator) -> dict:
    encodings, dense, encode_s, weights = build_model(rng)
    start = time.perf_counter()
    blob = cpz.pack_cpz(encodings, {"arch": "resnet18", "synthetic": True})
    pack_s = time.perf_counter() - start
    stats = [s for s in cpz.inspect_cpz(blob) if s["kind"] == "clustered"]
    decode_s = best_time(lambda: cpz.unpack_cpz(blob), repeats=3)
    tensors, _ = cpz.unpack_cpz(blob)
    for name, indices in dense.items():  # the benchmark doubles as a large round-trip test
        assert np.array_equal(tensors[name].indices, indices), name

    methods: dict[str, int] = {}
    for s in stats:
        methods[s["positions_method"]] = methods.get(s["positions_method"], 0) + 1
    table_bytes = sum(s["table_bytes"] for s in stats)
    positions = stream_report(stats, "positions")
    values = stream_report(stats, "values")
    symbols = positions["symbols"] + values["symbols"]
    all_indices = np.concatenate([d.reshape(-1) for d in dense.values()]).tobytes()
    streams = {}
    for stream in ("positions", "values"):
        syms = []
        for enc in encodings.values():
            if stream == "values":
                part = enc.values
            else:
                part = enc.positions.stream if enc.positions is not None else None
            if isinstance(part, cpz.HuffmanStream):
                syms.append(part.decode().astype(np.uint16 if part.alphabet > 256 else np.uint8))
        streams[stream] = np.concatenate(syms).tobytes()
    ours = {
        "positions": sum(s["positions_bytes"] for s in stats),
        "values": sum(s["values_bytes"] for s in stats),
    }
    return {
        "weights": weights,
        "nonzero": int(sum(s["nonzero"] for s in stats)),
        "positions_methods": methods,
        "fp32_bytes": 4 * weights,
        "cpz_bytes": len(blob),
        "compression_vs_fp32": 4 * weights / len(blob),
        "bits_per_weight": 8 * len(blob) / weights,
        "table_bytes": table_bytes,
        "positions_stream": positions,
        "values_stream": values,
        "ratio_to_entropy_with_tables": (8 * (ours["positions"] + ours["values"] + table_bytes))
        / (
            positions["entropy_bits_per_symbol"] * positions["symbols"]
            + values["entropy_bits_per_symbol"] * values["symbols"]
        ),
        "baselines_bytes": {
            "cpz_positions_stream": ours["positions"],
            "cpz_values_stream": ours["values"],
            "positions_stream": zlib_sizes(streams["positions"]),
            "values_stream": zlib_sizes(streams["values"]),
            "dense_uint8_indices": zlib_sizes(all_indices),
        },
        "encode_seconds": encode_s,
        "pack_seconds": pack_s,
        "read_seconds": decode_s,
        "read_symbols_per_second": symbols / decode_s,
        "read_weights_per_second": weights / decode_s,
    }


def stream_benchmark(rng: np.random.Generator, probabilities: np.ndarray) -> dict:
    """One 10M-symbol stream drawn from the model's values histogram (16-symbol alphabet),
    coded one symbol per code (plain Huffman) and two per code (what .cpz picks here)."""
    symbols = rng.choice(probabilities.size, STREAM_SYMBOLS, p=probabilities).astype(np.uint8)
    entropy = huffman.entropy_bits(np.bincount(symbols))
    raw = symbols.tobytes()
    z9 = zlib.compress(raw, 9)
    hobj = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    zh = hobj.compress(raw) + hobj.flush()
    result: dict = {
        "symbols": STREAM_SYMBOLS,
        "alphabet": int(probabilities.size),
        "used_symbols": int(np.count_nonzero(np.bincount(symbols))),
        "entropy_bits_per_symbol": entropy / STREAM_SYMBOLS,
        "zlib9_bits_per_symbol": 8 * len(z9) / STREAM_SYMBOLS,
        "zlib9_decode_symbols_per_second": STREAM_SYMBOLS / best_time(lambda: zlib.decompress(z9)),
        "zlib_huffman_only_bits_per_symbol": 8 * len(zh) / STREAM_SYMBOLS,
        "zlib_huffman_only_decode_symbols_per_second": STREAM_SYMBOLS
        / best_time(lambda: zlib.decompress(zh)),
    }
    for group in (1, 2):

        def encode(group: int = group) -> cpz.HuffmanStream:
            return cpz.HuffmanStream.from_symbols(symbols, probabilities.size, group)

        encode_s = best_time(encode, repeats=2)
        stream = encode()
        decode_s = best_time(stream.decode)
        assert np.array_equal(stream.decode(), symbols)
        result[f"group{group}"] = {
            "block_size": stream.block_size,
            "bits_per_symbol": 8 * len(stream.data) / STREAM_SYMBOLS,
            "table_bits_per_symbol": 8 * stream.table_bytes / STREAM_SYMBOLS,
            "ratio_to_entropy": 8 * len(stream.data) / entropy,
            "encode_seconds": encode_s,
            "encode_symbols_per_second": STREAM_SYMBOLS / encode_s,
            "decode_seconds": decode_s,
            "decode_symbols_per_second": STREAM_SYMBOLS / decode_s,
        }
    return result


def print_report(result: dict) -> None:
    m, s = result["model"], result["stream"]
    print(
        f"synthetic resnet18: {m['weights']:,} weights, {m['nonzero']:,} nonzero, positions {m['positions_methods']}"
    )
    for key in ("positions_stream", "values_stream"):
        r = m[key]
        print(
            f"  {key:17s} {r['symbols']:>10,} symbols  {r['bits_per_symbol']:.4f} bits/symbol"
            f"  entropy {r['entropy_bits_per_symbol']:.4f}  ratio {r['ratio_to_entropy']:.4f}"
        )
    print(f"  ratio to entropy incl. code/block tables: {m['ratio_to_entropy_with_tables']:.4f}")
    b = m["baselines_bytes"]
    print("  bytes: stream          cpz        zlib -9   zlib huffman-only")
    for key in ("positions", "values"):
        z = b[f"{key}_stream"]
        print(
            f"         {key:12s} {b[f'cpz_{key}_stream']:>10,} {z['zlib9']:>12,} {z['zlib_huffman_only']:>12,}"
        )
    z = b["dense_uint8_indices"]
    print(f"         dense uint8 indices       -  {z['zlib9']:>12,} {z['zlib_huffman_only']:>12,}")
    print(
        f"  .cpz {m['cpz_bytes']:,} bytes vs fp32 {m['fp32_bytes']:,} bytes: {m['compression_vs_fp32']:.1f}x,"
        f" {m['bits_per_weight']:.3f} bits/weight"
    )
    print(
        f"  encode {m['encode_seconds']:.2f}s + pack {m['pack_seconds']:.2f}s;"
        f" read {m['read_seconds']:.3f}s = {m['read_symbols_per_second'] / 1e6:.1f} M symbols/s,"
        f" {m['read_weights_per_second'] / 1e6:.1f} M weights/s"
    )
    print(
        f"single stream: {s['symbols']:,} symbols, alphabet {s['alphabet']} ({s['used_symbols']} used),"
        f" entropy {s['entropy_bits_per_symbol']:.4f} bits/symbol"
    )
    for group in (1, 2):
        g = s[f"group{group}"]
        print(
            f"  {group} symbol(s)/code: {g['bits_per_symbol']:.4f} bits/symbol"
            f" (+{g['table_bits_per_symbol']:.4f} tables), ratio {g['ratio_to_entropy']:.4f};"
            f" decode {g['decode_symbols_per_second'] / 1e6:.1f} M symbols/s,"
            f" encode {g['encode_symbols_per_second'] / 1e6:.1f} M symbols/s"
        )
    print(
        f"  zlib -9: {s['zlib9_bits_per_symbol']:.4f} bits/symbol, decompress"
        f" {s['zlib9_decode_symbols_per_second'] / 1e6:.1f} M symbols/s;"
        f" huffman-only: {s['zlib_huffman_only_bits_per_symbol']:.4f} bits/symbol,"
        f" {s['zlib_huffman_only_decode_symbols_per_second'] / 1e6:.1f} M symbols/s"
    )


def main() -> None:
    rng = np.random.default_rng(SEED)
    model = model_benchmark(rng)
    histogram = np.zeros(CLUSTERS + 1)
    indices, _ = prune_and_cluster(rng, (512, 512, 3, 3))
    histogram += np.bincount(indices[indices > 0], minlength=CLUSTERS + 1)
    probabilities = histogram[1:] / histogram[1:].sum()
    result = {
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "zstandard": zstandard is not None,
        },
        "model": model,
        "stream": stream_benchmark(rng, probabilities),
    }
    print_report(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"saved {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}"
    )


if __name__ == "__main__":
    main()
