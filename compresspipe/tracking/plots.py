"""Pictures logged to MLflow, drawn on standalone Figures: no display needed, and the global
matplotlib backend (a notebook's inline one) is left alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..compress.quant.onnx_int8 import OnnxModel, deployed_weights
from ..formats.cpz import byte_parts


def size_accuracy_plot(summary: dict[str, Any], path: Path) -> Path:
    """Model bytes on disk (log scale) against test top-1, one labelled point per stage."""
    from matplotlib.figure import Figure  # lazy: matplotlib loads only where a plot is drawn

    stages = summary["stages"]
    sizes = [s["metrics"]["model_bytes"] / 1024 for s in stages]
    accs = [s["metrics"]["test_top1"] for s in stages]
    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.subplots()
    ax.plot(sizes, accs, "-o", color="#3465a4")
    for s, x, y in zip(stages, sizes, accs):
        ax.annotate(s["name"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model file size on disk (KiB, log scale)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{summary['pipeline']}: size vs accuracy per stage")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def layer_sparsity_plot(per_layer: dict[str, float], path: Path, title: str) -> Path:
    """Horizontal bars: the fraction of zeros in each masked tensor."""
    from matplotlib.figure import Figure  # lazy: matplotlib loads only where a plot is drawn

    names = list(per_layer)
    fig = Figure(figsize=(6.4, max(2.5, 0.22 * len(names) + 1)), dpi=110)
    ax = fig.subplots()
    ax.barh(range(len(names)), [100 * per_layer[n] for n in names], color="#cc0000")
    ax.set_yticks(range(len(names)), [n.removesuffix(".weight") for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("zeros (%)")
    ax.set_title(f"{title}: per-layer sparsity")
    fig.tight_layout()
    fig.savefig(path)
    return path


# -- weights before and after a quantizing stage ------------------------------------------------

INT8_LEVELS = 127  # symmetric int8 weights: codes -127..127 (artifact.quant["int8"]["weights"])


def weight_arrays(model: Any) -> dict[str, Any]:
    """Copies of the conv/linear weights (parameters of 2+ dims) as float32 numpy arrays."""
    return {n: p.detach().float().cpu().numpy().copy() for n, p in model.named_parameters()
            if p.ndim >= 2}


def deployed_weight_pairs(before: dict[str, Any], deployed: Any
                          ) -> tuple[dict[str, tuple[Any, Any]], bool]:
    """{weight name: (before, after)} of the weights the deployed model really runs with, and
    whether they are per-channel normalised.

    A deployed ``nn.Module`` (codebook, .cpz) gives its weights in their own units. An int8 ONNX
    file folds batch norm into the convolutions, which rescales every output channel: both
    sides are then divided by their channel's largest magnitude, which that rescaling leaves
    unchanged, so the int8 grid (k / 127) is compared with the fp32 weights it replaced.
    """

    if isinstance(deployed, OnnxModel):
        pairs = {}
        for name, (values, zp, axis) in deployed_weights(deployed.path).items():
            if name not in before:
                continue
            centred = values.astype(np.float32)
            if np.ndim(zp):
                shape = [1] * values.ndim
                shape[axis] = -1
                centred = centred - np.asarray(zp, np.float32).reshape(shape)
            else:
                centred = centred - np.float32(zp)
            if centred.shape != before[name].shape and centred.T.shape == before[name].shape:
                centred = centred.T  # MatMul weights are stored transposed
            if centred.shape == before[name].shape:
                pairs[name] = (_per_channel(before[name]), _per_channel(centred))
        return pairs, True
    after = weight_arrays(deployed)
    return {n: (before[n], after[n]) for n in before
            if n in after and after[n].shape == before[n].shape}, False


def _per_channel(w: Any) -> Any:
    flat = w.reshape(w.shape[0], -1)
    peak = np.abs(flat).max(axis=1, keepdims=True)
    return (flat / np.where(peak > 0, peak, 1)).reshape(w.shape)


def _distinct_per_channel(w: Any) -> int:
    """Most distinct nonzero values in one output channel (a clustered layer: at most its
    codebook; int8: at most 254 codes)."""
    rows = np.sort(w.reshape(w.shape[0], -1), axis=1)
    distinct = (np.diff(rows, axis=1) != 0).sum(axis=1) + 1 - (rows == 0).any(axis=1)
    return int(distinct.max(initial=0))


def weight_histogram_plot(pairs: dict[str, tuple[Any, Any]], normalized: bool, path: Path,
                          title: str, panels: int = 4) -> Path:
    """Histograms of the nonzero weights before (filled) and after (outline) a stage: all
    layers pooled, then the largest layers, on shared bins and a log count axis."""
    from matplotlib import ticker  # lazy: matplotlib loads only where a plot is drawn
    from matplotlib.figure import Figure

    def nonzero(a):
        a = a.reshape(-1)
        return a[a != 0]

    largest = sorted(pairs, key=lambda n: -pairs[n][0].size)[: panels - 1]
    groups = [(f"all {len(pairs)} layers", list(pairs))] + [(n, [n]) for n in largest]
    cols = 2 if len(groups) > 1 else 1
    rows = -(-len(groups) // cols)
    fig = Figure(figsize=(6.4 * cols / 1.4, 3.0 * rows), dpi=110)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (label, names) in zip(axes.flat, groups):
        b = np.concatenate([nonzero(pairs[n][0]) for n in names])
        a = np.concatenate([nonzero(pairs[n][1]) for n in names])
        distinct = max((_distinct_per_channel(pairs[n][1]) for n in names), default=0)
        if normalized:
            bins = (np.arange(-INT8_LEVELS, INT8_LEVELS + 2) - 0.5) / INT8_LEVELS
        else:
            both = np.concatenate([b, a]) if a.size else b
            low, high = (float(both.min()), float(both.max())) if both.size else (-1.0, 1.0)
            bins = np.linspace(low, high if high > low else low + 1, 201)
        # stairs: one artist per histogram (ax.hist draws a patch per bin, seconds per plot)
        ax.stairs(np.histogram(b, bins)[0], bins, fill=True, color="#babdb6",
                  label=f"before ({b.size:,} nonzero)")
        ax.stairs(np.histogram(a, bins)[0], bins, color="#cc0000", linewidth=0.9,
                  label=f"after (≤{distinct:,} values per channel)")
        ax.set_yscale("log")
        # plain tick labels: the default 10^k mathtext makes the layout take seconds
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(ticker.NullLocator())
        ax.set_title(label.removesuffix(".weight"), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right")
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.supxlabel("weight / largest |weight| of its output channel" if normalized
                  else "weight value", fontsize=8)
    fig.supylabel("count (log)", fontsize=8)
    fig.suptitle(f"{title}: nonzero weights before vs after", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path


# -- where the bits of a .cpz go ---------------------------------------------------------------

CPZ_PARTS = (("positions", "#3465a4"), ("values", "#73d216"), ("tables", "#f57900"),
             ("raw", "#babdb6"), ("container", "#555753"))


def cpz_breakdown(rows: list[dict[str, Any]], file_bytes: int, params: int
                  ) -> list[tuple[str, dict[str, float]]]:
    """Bits per weight of each layer (tensors of 2+ dims) split into sparse positions, coded
    values, tables (Huffman code lengths, block offsets, codebooks) and raw storage, then the whole file per model parameter with
    the other raw tensors (biases, norms) and the container (header, index, metadata).
    ``rows`` is ``compresspipe.formats.inspect_cpz``'s per-tensor accounting."""
    bars = []
    totals = dict.fromkeys((name for name, _ in CPZ_PARTS), 0.0)
    for r in rows:
        parts = byte_parts(r)
        for k, v in parts.items():
            totals[k] += v
        if len(r["shape"]) >= 2 and r["elements"]:
            bars.append((r["name"], {k: 8.0 * v / r["elements"] for k, v in parts.items()}))
    totals["container"] = file_bytes - sum(totals.values())
    bars.append((f"whole file ({file_bytes:,} B)",
                 {k: 8.0 * v / max(params, 1) for k, v in totals.items()}))
    return bars


def cpz_bits_plot(bars: list[tuple[str, dict[str, float]]], path: Path, title: str) -> Path:
    """Horizontal stacked bars of ``cpz_breakdown``: one per layer, the whole file last."""
    from matplotlib.figure import Figure  # lazy: matplotlib loads only where a plot is drawn

    fig = Figure(figsize=(6.4, max(2.5, 0.24 * len(bars) + 1.2)), dpi=110)
    ax = fig.subplots()
    left = [0.0] * len(bars)
    for part, color in CPZ_PARTS:
        widths = [parts.get(part, 0.0) for _, parts in bars]
        if any(widths):
            ax.barh(range(len(bars)), widths, left=left, color=color, label=part)
            left = [a + b for a, b in zip(left, widths)]
    for y, total in enumerate(left):
        ax.annotate(f"{total:.2f}", (total, y), xytext=(3, 0), textcoords="offset points",
                    va="center", fontsize=6)
    ax.set_yticks(range(len(bars)), [n.removesuffix(".weight") for n, _ in bars], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("bits per weight (whole file: per model parameter)")
    ax.set_title(f"{title}: where the bits of the .cpz go", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return path


def widths_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Horizontal bars: kept fraction of each layer's output channels, labelled kept/total."""
    from matplotlib.figure import Figure  # lazy: matplotlib loads only where a plot is drawn

    height = max(2.5, 0.22 * len(rows) + 1.2)
    fig = Figure(figsize=(7.0, height), dpi=100)
    ax = fig.subplots()
    y = list(range(len(rows)))
    fractions = [r["kept"] / r["total"] for r in rows]
    ax.barh(y, [1.0] * len(rows), color="#d3d7cf")
    ax.barh(y, fractions, color="#3465a4")
    for i, r in enumerate(rows):
        ax.text(1.01, i, f"{r['kept']}/{r['total']}", va="center", fontsize=7)
    ax.set_yticks(y, [r["layer"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("kept fraction of output channels")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path
