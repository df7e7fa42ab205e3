"""A finished (or interrupted) search's report: the Pareto table (Markdown and JSON), its plot,
and the chosen point as a plain pipeline file that ``compresspipe run`` reproduces.

Choosing reads the bytes and validation top-1 of each trial (Optuna's user attributes); the
test top-1 is read afterwards, from the chosen trials' summaries only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import yaml

from ..core.artifact import write_json
from ..core.errors import CompressPipeError
from ..tracking import plots

REPORT = "pareto"
BEST_FILE = "best.yaml"


def val_top1(metrics: dict[str, Any]) -> float:
    """The accuracy every search decision uses: the saved model's validation top-1
    (``deployed_val_top1``). Never the test set: without a validation split there is nothing
    to choose by, and that is an error."""
    if "deployed_val_top1" not in metrics:
        raise CompressPipeError("search: the stages report no validation accuracy; a search "
                                "chooses on the validation split, so set data.val_split > 0")
    return float(metrics["deployed_val_top1"])


def test_top1(metrics: dict[str, Any]) -> float | None:
    """Test top-1, for reporting the chosen points only."""
    value = metrics.get("test_top1")
    return None if value is None else float(value)


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per completed trial: what it tried and its bytes and validation accuracy."""
    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        a = t.user_attrs
        rows.append({"trial": t.number, "values": a["values"], "bytes": a["bytes"],
                     "val_top1": a["val_top1"], "val_top1_drop": a["val_top1_drop"],
                     "stage_runs_executed": a.get("stage_runs_executed"),
                     "output_dir": a.get("output_dir")})
    return rows


def choose(rows: list[dict[str, Any]], max_drop: float) -> dict[str, Any] | None:
    """Mark the Pareto front (fewer bytes, higher validation top-1) and return the chosen
    row: the smallest among those within the accuracy budget (ties: the more accurate)."""
    for r in rows:
        r["feasible"] = r["val_top1_drop"] <= max_drop + 1e-9
        r["pareto"] = not any(
            o["bytes"] <= r["bytes"] and o["val_top1"] >= r["val_top1"]
            and (o["bytes"] < r["bytes"] or o["val_top1"] > r["val_top1"]) for o in rows)
        r["best"] = False
    feasible = [r for r in rows if r["feasible"]]
    if not feasible:
        return None
    best = min(feasible, key=lambda r: (r["bytes"], -r["val_top1"], r["trial"]))
    best["best"] = True
    return best


def write_report(search: Any, study: optuna.Study) -> dict[str, Any]:
    """Write the report of ``search`` (a search.Search, which imports this module)."""
    out = search.out
    rows = trial_rows(study)
    objective = search.cfg.objective
    best = choose(rows, objective.max_val_top1_drop)
    reference = next((t.user_attrs["reference_val_top1"] for t in study.trials
                      if "reference_val_top1" in t.user_attrs), None)
    for r in rows:  # test accuracy of the chosen points only, read after choosing
        r["test_top1"] = None
        if r["pareto"] or r["best"]:
            summary = json.loads((Path(r["output_dir"]) / "summary.json").read_text())
            r["test_top1"] = test_top1(summary["stages"][-1]["metrics"])
    best_yaml = None
    if best is not None:
        best_yaml = out / BEST_FILE
        raw = search.trial_pipeline(best["values"], out / "best",
                                    f"{search.pipeline.config.name}-best", share_cache=False)
        header = (f"# Chosen by the search {search.name!r} (trial {best['trial']}): "
                  f"{best['bytes']:,} bytes, validation top-1 {best['val_top1']:.2f}%.\n"
                  f"# `compresspipe run {best_yaml.name}` reproduces it.\n")
        best_yaml.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    floor = None if reference is None else reference - objective.max_val_top1_drop
    report = {"study": search.name, "objective": objective.model_dump(mode="json"),
              "reference_val_top1": reference, "trials": len(study.trials),
              "completed": len(rows), "pruned": len(study.get_trials(
                  deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))),
              "best": best, "rows": rows}
    write_json(out / f"{REPORT}.json", report)
    table = markdown_table(rows, reference, objective.max_val_top1_drop)
    (out / f"{REPORT}.md").write_text(table + "\n")
    plot = plots.pareto_plot(rows, out / f"{REPORT}.png", f"search {search.name}: bytes vs "
                             "validation top-1", floor)
    return {"table": table, "report_md": str(out / f"{REPORT}.md"),
            "report_json": str(out / f"{REPORT}.json"), "plot": str(plot),
            "best_yaml": str(best_yaml) if best_yaml else None, "best": best, "rows": rows}


def markdown_table(rows: list[dict[str, Any]], reference: float | None, max_drop: float) -> str:
    ref = "?" if reference is None else f"{reference:.2f}%"
    lines = [f"Reference validation top-1 {ref}; budget: a drop of at most {max_drop:g} pt. "
             "Test top-1 is given for the Pareto front and the chosen point only.", "",
             "| trial | values | bytes | val top-1 | drop (pt) | within budget | Pareto | "
             "test top-1 |",
             "|---:|---|---:|---:|---:|:---:|:---:|---:|"]
    for r in sorted(rows, key=lambda r: r["bytes"]):
        values = ", ".join(f"{k.removeprefix('stages.')}={_short(v)}"
                           for k, v in r["values"].items())
        test = "" if r["test_top1"] is None else f"{r['test_top1']:.2f}"
        mark = " **chosen**" if r["best"] else ""
        lines.append(f"| {r['trial']}{mark} | {values} | {r['bytes']:,} | {r['val_top1']:.2f} | "
                     f"{r['val_top1_drop']:.2f} | {'yes' if r['feasible'] else 'no'} | "
                     f"{'yes' if r['pareto'] else ''} | {test} |")
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
