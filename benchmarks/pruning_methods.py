"""Pruning methods on builtin digits with a timm ResNet: accuracy and loss at several sparsities,
mean ± std over seeds, epochs spent. Every number is measured by the pipeline on the model reloaded
from its artifact file.

    .venv/bin/python benchmarks/pruning_methods.py [--quick] [--model resnet10t] [--seeds 3]

All methods of one seed start from the same dense stage (trained once, copied into each method's
directory and reused through --resume's fingerprints); every method keeps its own directory, so a
second call with the same --workdir resumes instead of recomputing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

DENSE, RETRAIN, ROUNDS = 6, 2, 3  # epochs; IMP retrains RETRAIN epochs in each of ROUNDS rounds
RESULTS = Path(__file__).resolve().parent / "results"


def methods(sparsity: float) -> dict[str, tuple[list[dict], int]]:
    """name -> (stages after the dense stage, or a full stage list; total epochs spent)."""
    ft = {"epochs": RETRAIN * ROUNDS, "lr": 0.05}
    per_round = {"epochs": RETRAIN, "lr": 0.05}
    total = DENSE + RETRAIN * ROUNDS
    prune = lambda **kw: [{"name": "m", "prune": {"sparsity": sparsity, **kw}}]  # noqa: E731
    return {
        "oneshot+FT": (prune(method="oneshot", retrain="ft", train=ft), total),
        "random+FT": (prune(method="oneshot", criterion="random", retrain="ft", train=ft), total),
        "IMP+FT": (prune(method="imp", rounds=ROUNDS, retrain="ft", train=per_round), total),
        "IMP+LRW": (prune(method="imp", rounds=ROUNDS, retrain="lrw", train=per_round), total),
        "LTH (late rewind)": (prune(method="lth", rounds=ROUNDS, control=True, train=per_round),
                              total),
        "IMP+ALLR": (prune(method="imp", rounds=ROUNDS, retrain="allr", train=per_round), total),
        "GMP": (prune(method="gmp", gmp={"end_epoch": 0.75 * RETRAIN * ROUNDS, "frequency": 5},
                      train={"epochs": RETRAIN * ROUNDS, "lr": 0.02}), total),
        "BIMP+ALLR": ([{"name": "m", "prune": {
            "sparsity": sparsity, "method": "bimp", "rounds": ROUNDS,
            "bimp": {"total_epochs": total, "dense_epochs": DENSE},
            "train": {"epochs": DENSE, "lr": 0.05, "schedule": "linear"}}}], total),
        **{f"{c.upper() if c != 'synflow' else 'SynFlow'} at init": (
            [{"name": "m", "prune": {"sparsity": sparsity, "method": "at_init", "criterion": c,
                                     "synflow_rounds": 50, "train": {"epochs": total, "lr": 0.05}}}],
            total) for c in ("snip", "grasp", "synflow")},
    }


def pipeline(out: Path, model: str, seed: int, stages: list[dict], with_dense: bool) -> dict:
    dense = {"name": "dense", "train": {"epochs": DENSE, "lr": 0.05, "warmup_epochs": 1,
                                        "record_rewind": {"epoch": 0.5}}}
    return {"name": "bench", "seed": seed, "output_dir": str(out), "model": {"name": model},
            "data": {"name": "digits", "image_size": 32, "batch_size": 64},
            "stages": ([dense] if with_dense else []) + stages}


def dense_run(root: Path, model: str, seed: int) -> Path:
    """The seed's dense training, run once and copied into each method's directory."""
    out = root / f"seed{seed}-dense"
    import compresspipe

    compresspipe.run(pipeline(out, model, seed, [], True), resume=True)
    return out


def control_metric(summary: dict, key: str) -> float | None:
    from mlflow.tracking import MlflowClient

    run_id = summary["stages"][-1].get("run_id")
    if not run_id:
        return None
    metrics = MlflowClient(summary["tracking_uri"]).get_run(run_id).data.metrics
    return metrics.get(key)


def main() -> None:
    import compresspipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 sparsities, 1 seed")
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only-seed", type=int, default=None,
                    help="run just this seed (parallel workers sharing --workdir; a final call "
                    "without it resumes them all and writes the table)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the runs here; a second call resumes them instead of starting over")
    args = ap.parse_args()
    sparsities = [0.9, 0.98] if args.quick else [0.9, 0.95, 0.98, 0.99]
    seeds = list(range(1 if args.quick else args.seeds))
    if args.only_seed is not None:
        seeds = [args.only_seed]
    rows: dict[tuple[str, float], list[dict]] = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.workdir or scratch
        for seed in seeds:
            for s in sparsities:
                for name, (stages, epochs) in methods(s).items():
                    with_dense = stages[0]["prune"]["method"] not in ("bimp", "at_init")
                    out = Path(tmp) / f"seed{seed}-{name}-{s}"
                    if with_dense and not out.exists():
                        # its own directory (so a rerun resumes every method), seeded with the
                        # seed's dense stage: same trained weights and rewind point for all
                        shutil.copytree(dense_run(Path(tmp), args.model, seed), out)
                    cfg = pipeline(out, args.model, seed, stages, with_dense)
                    summary = compresspipe.run(cfg, resume=True)
                    m = summary["stages"][-1]["metrics"]
                    rows.setdefault((name, s), []).append(
                        {"top1": m["test_top1"], "loss": m["test_loss"], "epochs": epochs})
                    if name.startswith("LTH"):
                        rows.setdefault(("LTH random re-init control", s), []).append({
                            "top1": control_metric(summary, "control_top1"),
                            "loss": control_metric(summary, "control_loss"), "epochs": epochs})
            # DSD against dense trained for the same total epochs
            dsd = [{"name": "dsd", "prune": {"method": "dsd", "sparsity": 0.3, "scope": "layer",
                                            "first_layer": "exclude",
                                            "dsd": {"sparse_epochs": 3, "redense_epochs": 3},
                                            "train": {"epochs": 3, "lr": 0.05}}}]
            longer = [{"name": "dense12", "train": {"epochs": DENSE + 6, "lr": 0.05,
                                                    "warmup_epochs": 1}}]
            for name, slug, stages, dense_first in (("DSD (30%)", "dsd", dsd, True),
                                                    ("dense, same epochs", "dense12", longer, False)):
                out = Path(tmp) / f"seed{seed}-{slug}"
                if dense_first and not out.exists():
                    shutil.copytree(dense_run(Path(tmp), args.model, seed), out)
                summary = compresspipe.run(pipeline(out, args.model, seed, stages, dense_first),
                                           resume=True)
                m = summary["stages"][-1]["metrics"]
                rows.setdefault((name, 0.0), []).append(
                    {"top1": m["test_top1"], "loss": m["test_loss"], "epochs": DENSE + 6})
    report(rows, args, time.time() - started)


def _ms(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def report(rows: dict, args, seconds: float) -> None:
    lines = [f"model {args.model}, digits 32x32, seeds {1 if args.quick else args.seeds}, "
             f"{seconds / 60:.1f} min", "",
             "| method | sparsity | top-1 % (mean ± std) | test loss | epochs |",
             "|---|---:|---:|---:|---:|"]
    for (name, s), vals in rows.items():
        lines.append(f"| {name} | {s:.0%} | {_ms([v['top1'] for v in vals])} | "
                     f"{_ms([v['loss'] for v in vals])} | {vals[0]['epochs']} |")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    tag = "_quick" if args.quick else ""
    (RESULTS / f"pruning_methods{tag}.md").write_text(text + "\n")
    (RESULTS / f"pruning_methods{tag}.json").write_text(json.dumps(
        [{"method": n, "sparsity": s, "runs": v} for (n, s), v in rows.items()], indent=1))


if __name__ == "__main__":
    main()
