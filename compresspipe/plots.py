"""Pictures logged to MLflow. matplotlib's Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def size_accuracy_plot(summary: dict[str, Any], path: Path) -> Path:
    """Model bytes on disk (log scale) against top-1, one labelled point per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = summary["stages"]
    sizes = [s["metrics"]["model_bytes"] / 1024 for s in stages]
    accs = [s["metrics"]["top1"] for s in stages]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
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
    plt.close(fig)
    return path


def layer_sparsity_plot(per_layer: dict[str, float], path: Path, title: str) -> Path:
    """Horizontal bars: the fraction of zeros in each masked tensor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_layer)
    fig, ax = plt.subplots(figsize=(6.4, max(2.5, 0.22 * len(names) + 1)), dpi=110)
    ax.barh(range(len(names)), [100 * per_layer[n] for n in names], color="#cc0000")
    ax.set_yticks(range(len(names)), [n.removesuffix(".weight") for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("zeros (%)")
    ax.set_title(f"{title}: per-layer sparsity")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
