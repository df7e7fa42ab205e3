"""Would context modelling pay? Conditional entropies of the .cpz streams of a clustered model.

For every clustered layer of a cluster-stage artifact (indices with the zero index marking pruned
weights), in bits over the whole model:
  positions  the order-0 entropy of the escape-coded gaps (what a Huffman code per tensor
             approaches: the current coder) and the bytes the .cpz's gap coder gives the mask
             (the file may code a dense layer's zeros as values instead: ``compresspipe
             inspect``); the conditional entropy of the gap given the previous gap
             (bucketed), given the output channel; significance
             flags (one per weight) given the kernel position, and given kernel position plus the
             previous flag (what a context-adaptive binary coder such as DeepCABAC approaches);
  values     the order-0 entropy of the nonzero cluster indices and given the kernel position, the
             output channel, and the previous value.
Conditional entropies are plug-in estimates (they ignore the cost of describing one table per
context, so they are optimistic for context models with many contexts: the gap given the output
channel is the example); the per-channel density model charges 16 bits per channel and is the
honest figure for per-channel adaptation. "gain" is against the order-0 bound. Context modelling is worth adding where the gain exceeds 3%.
The ``*_adaptive`` figures are what an adaptive arithmetic coder (rANS or CABAC-like, one
Krichevsky-Trofimov count table per context, learnt while coding) would write: the exact code
length of that model, which, unlike a plug-in entropy, pays for learning its contexts.

    .venv/bin/python benchmarks/coding_context.py STAGE_DIR [--pipeline FILE] [--name NAME]

``--pipeline``: the file that made the run, when its model comes from a Python factory (which
a saved artifact alone is not trusted to import). Saves benchmarks/results/coding_context.json
(``coding_context_NAME.json`` with ``--name``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compresspipe.core import artifact_keys  # noqa: E402
from compresspipe.core.artifact import Artifact  # noqa: E402
from compresspipe.core.errors import CompressPipeError  # noqa: E402
from compresspipe.core.models import allow_named_factories  # noqa: E402
from compresspipe.formats.cpz import encode_positions, escape, gaps  # noqa: E402
from compresspipe.formats.huffman import entropy_bits  # noqa: E402
from compresspipe.pipeline.loader import load_pipeline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def h0(symbols: np.ndarray) -> float:
    return float(entropy_bits(np.unique(symbols, return_counts=True)[1])) if symbols.size else 0.0


def h_given(symbols: np.ndarray, context: np.ndarray) -> float:
    """Plug-in conditional entropy in bits (total, not per symbol)."""
    order = np.lexsort((symbols, context))
    s, c = symbols[order], context[order]
    total = 0.0
    bounds = np.flatnonzero(np.diff(c)) + 1
    for part in np.split(s, bounds):
        total += h0(part)
    return total


def adaptive_bits(symbols: np.ndarray, context: np.ndarray) -> float:
    """Bits an adaptive KT model per context codes ``symbols`` in: for a context with counts
    n_k over K symbols, log2 Gamma(n + K/2) / Gamma(K/2) - sum_k log2 Gamma(n_k + 1/2) / Gamma(1/2),
    whatever the order of the symbols (the estimator's sequential code length)."""
    if not symbols.size:
        return 0.0
    _, ctx = np.unique(context, return_inverse=True)
    _, sym = np.unique(symbols, return_inverse=True)
    k = int(sym.max()) + 1
    counts = torch.zeros(int(ctx.max()) + 1, k, dtype=torch.float64)
    counts.index_put_((torch.from_numpy(ctx), torch.from_numpy(sym)),
                      torch.ones(sym.size, dtype=torch.float64), accumulate=True)
    half = torch.tensor(0.5, dtype=torch.float64)
    nats = (torch.lgamma(counts.sum(1) + k * half) - torch.lgamma(k * half)).sum() \
        - (torch.lgamma(counts + half) - torch.lgamma(half)).sum()
    return float(nats) / math.log(2)


def bucket(x: np.ndarray) -> np.ndarray:
    """0, 1, 2-3, 4-7, ...: a log2 bucket of a gap."""
    return np.where(x > 0, np.floor(np.log2(np.maximum(x, 1))).astype(np.int64) + 1, 0)


def layer_stats(idx: np.ndarray, zero: int) -> dict[str, float]:
    flat = idx.reshape(-1)
    mask = flat != zero
    nz = np.flatnonzero(mask)
    out_ch = idx.shape[0]
    per_out = flat.size // out_ch
    kpos_all = np.arange(flat.size) % (int(np.prod(idx.shape[2:])) if idx.ndim > 2 else 1)
    g = gaps(nz)
    pos = encode_positions(mask)
    bits = pos.bits if pos.stream is not None else 8
    esc = escape(g, bits).astype(np.int64)
    prev = np.concatenate([[0], g[:-1]])
    flags = mask.astype(np.int64)
    prev_flag = np.concatenate([[0], flags[:-1]])
    values = flat[mask].astype(np.int64)
    prev_value = np.concatenate([[0], values[:-1]])
    return {
        "weights": float(flat.size), "nonzero": float(nz.size),
        "positions_bytes_written": float(pos.nbytes),
        "positions_h0_escaped": h0(esc),
        "positions_h0_gaps": h0(g),
        "positions_h_gap_given_prev_gap": h_given(g, bucket(prev)),
        "positions_h_gap_given_out_channel": h_given(g, nz // per_out),
        "positions_h_flags_order0": h0(flags),
        "positions_h_flags_given_kpos": h_given(flags, kpos_all),
        "positions_h_flags_given_kpos_prev": h_given(flags, kpos_all * 2 + prev_flag),
        "positions_h_flags_given_kpos_prev_outch": h_given(
            flags, (np.arange(flat.size) // per_out) * 1000 + kpos_all * 2 + prev_flag),
        # per output channel, its own density: n_c H_b(k_c / n_c) plus 16 bits to describe it;
        # honest where the plug-in figure above over-fits many small contexts
        "positions_h_flags_given_channel_density": float(sum(
            entropy_bits(np.array([k, per_out - k])) + 16
            for k in np.bincount(nz // per_out, minlength=out_ch))),
        "positions_flags_adaptive_order0": adaptive_bits(flags, np.zeros_like(flags)),
        "positions_flags_adaptive_given_out_channel": adaptive_bits(flags, np.arange(flat.size)
                                                                    // per_out),
        "positions_flags_adaptive_given_kpos_prev_outch": adaptive_bits(
            flags, (np.arange(flat.size) // per_out) * 1000 + kpos_all * 2 + prev_flag),
        "values_h0": h0(values),
        "values_h_given_kpos": h_given(values, kpos_all[mask]),
        "values_h_given_out_channel": h_given(values, nz // per_out),
        "values_h_given_prev": h_given(values, prev_value),
        "values_adaptive_order0": adaptive_bits(values, np.zeros_like(values)),
        "values_adaptive_given_out_channel": adaptive_bits(values, nz // per_out),
    }


def context_totals(artifact: Artifact) -> dict[str, float]:
    """:func:`layer_stats` summed over the artifact's clustered layers (bits)."""
    totals: dict[str, float] = {}
    for name, info in artifact_keys.cluster_layers(artifact).items():
        idx, _ = (t.numpy() for t in artifact_keys.cluster_tensors(artifact.extras, name))
        shape = tuple(artifact.model.state_dict()[name].shape)
        for k, v in layer_stats(idx.reshape(shape), info.get("zero_index", 0)).items():
            totals[k] = totals.get(k, 0.0) + v
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage_dir", type=Path)
    parser.add_argument("--pipeline", type=Path, help="the pipeline file that made the run")
    parser.add_argument("--name", help="save as coding_context_NAME.json")
    args = parser.parse_args()
    if args.pipeline:
        allow_named_factories(load_pipeline(args.pipeline, check_model=False).raw)
    try:
        totals = context_totals(Artifact.load(args.stage_dir))
    except CompressPipeError as exc:
        raise SystemExit(f"error: {exc}. A factory model: pass its pipeline file with "
                         "--pipeline.") from None
    base_pos, base_val = totals["positions_h0_escaped"], totals["values_h0"]
    models = [k for k in totals if "_h" in k or "adaptive" in k]
    gains = {k: 1 - totals[k] / (base_pos if k.startswith("positions") else base_val)
             for k in models}
    result = {"stage_dir": str(args.stage_dir), "bits": totals, "gain_vs_order0": gains,
              "bytes": {k: totals[k] / 8 for k in models}}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"coding_context{'_' + args.name if args.name else ''}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"{totals['weights']:,.0f} weights, {totals['nonzero']:,.0f} nonzero; positions "
          f"by the gap coder {totals['positions_bytes_written']:,.0f} B")
    for k in models:
        print(f"  {k:<48} {totals[k] / 8:>10,.0f} B  gain vs order-0 {gains[k]:+.1%}")


if __name__ == "__main__":
    main()
