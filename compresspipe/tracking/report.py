"""Human-readable views of a run's summary."""

from __future__ import annotations

from typing import Any


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown table: one row per stage with accuracy, loss, bytes on disk and ratio."""
    rows = ["| stage | type | top-1 % | loss | params | sparsity | model bytes | vs fp32 | time s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for rec in summary.get("stages", []):
        m = rec["metrics"]
        rows.append(
            f"| {rec['name']} | {rec['type']} | {m['top1']:.2f} | {m['loss']:.4f} | "
            f"{int(m['params']):,} | {m['sparsity']:.1%} | {int(m['model_bytes']):,} | "
            f"{m['compression_ratio']:.2f}x | {m['wall_time_s']:.1f} |"
        )
    return "\n".join(rows)
