"""Human-readable views of a run's summary."""

from __future__ import annotations

from typing import Any


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown table: one row per stage with accuracy (validation and test split), test loss,
    bytes on disk and ratio."""
    rows = ["| stage | type | val top-1 % | test top-1 % | test loss | params | sparsity | "
            "model bytes | vs fp32 | time s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rec in summary.get("stages", []):
        m = rec["metrics"]
        val = f"{m['deployed_val_top1']:.2f}" if "deployed_val_top1" in m else "-"
        rows.append(
            f"| {rec['name']} | {rec['type']} | {val} | {m['test_top1']:.2f} | "
            f"{m['test_loss']:.4f} | "
            f"{int(m['params']):,} | {m['sparsity']:.1%} | {int(m['model_bytes']):,} | "
            f"{m['compression_ratio']:.2f}x | {m['wall_time_s']:.1f} |"
        )
    return "\n".join(rows)
