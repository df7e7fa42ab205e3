"""Pruning methods: accuracy and loss at several sparsities, mean ± std over seeds, epochs spent.
Every number is measured by the pipeline on the model reloaded from its artifact file.

    .venv/bin/python benchmarks/pruning_methods.py [--quick] [--model resnet10t] [--seeds 3]
    .venv/bin/python benchmarks/pruning_methods.py --dataset fashion_mnist \
        --model compresspipe.zoo:lenet_300_100 --sparsities 0.98 --extreme 0.998

On Fashion-MNIST the seed papers' claims are checked from the numbers (seed_claims.{json,md}):
each claim's difference of seed means against its standard error (Welch), as distill does.

All methods of one seed start from the same dense stage (trained once, copied into each method's
directory and reused through --resume's fingerprints); every method keeps its own directory, so a
second call with the same --workdir resumes instead of recomputing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

DENSE, RETRAIN, ROUNDS = 6, 2, 3  # epochs; IMP retrains RETRAIN epochs in each of ROUNDS rounds
RESULTS = Path(__file__).resolve().parent / "results"
DATA = {"digits": {"name": "digits", "image_size": 32, "batch_size": 64},
        "fashion_mnist": {"name": "fashion_mnist", "root": "/usr/share/datasets/fashion-mnist",
                          "image_size": 28, "batch_size": 128}}
AT_INIT = ("snip", "grasp", "synflow")


def methods(sparsity: float, dense: int = DENSE, at_init: tuple[str, ...] = AT_INIT,
            floor: bool = True) -> dict[str, tuple[list[dict], int]]:
    """name -> (stages after the dense stage, or a full stage list; total epochs spent).
    ``floor`` False runs the at-init criteria without the min_layer_keep guard, so that layer
    collapse, the thing SynFlow is claimed to avoid, can happen."""
    ft = {"epochs": RETRAIN * ROUNDS, "lr": 0.05}
    per_round = {"epochs": RETRAIN, "lr": 0.05}
    total = dense + RETRAIN * ROUNDS
    prune = lambda **kw: [{"name": "m", "prune": {"sparsity": sparsity, **kw}}]  # noqa: E731
    guard = {} if floor else {"min_layer_keep": 0.0}
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
            "bimp": {"total_epochs": total, "dense_epochs": dense},
            "train": {"epochs": dense, "lr": 0.05, "schedule": "linear"}}}], total),
        **{f"{c.upper() if c != 'synflow' else 'SynFlow'} at init": (
            [{"name": "m", "prune": {"sparsity": sparsity, "method": "at_init", "criterion": c,
                                     "synflow_rounds": 50, **guard,
                                     "train": {"epochs": total, "lr": 0.05}}}],
            total) for c in at_init},
    }


def model_block(model: str) -> dict:
    """A timm name, or a factory 'pkg.mod:fn' (the zoo's LeNets take 28 px images)."""
    if ":" in model:
        return {"factory": model, "kwargs": {"image_size": 28}}
    return {"name": model}


def pipeline(out: Path, model: str, seed: int, stages: list[dict], with_dense: bool,
             dataset: str = "digits", dense_epochs: int = DENSE) -> dict:
    dense = {"name": "dense", "train": {"epochs": dense_epochs, "lr": 0.05, "warmup_epochs": 1,
                                        "record_rewind": {"epoch": 0.5}}}
    return {"name": "bench", "seed": seed, "output_dir": str(out), "model": model_block(model),
            "data": dict(DATA[dataset]),
            "stages": ([dense] if with_dense else []) + stages}


def dense_run(root: Path, args, seed: int) -> Path:
    """The seed's dense training, run once and copied into each method's directory."""
    out = root / f"seed{seed}-dense"
    import compresspipe

    compresspipe.run(pipeline(out, args.model, seed, [], True, args.dataset, args.dense_epochs),
                     resume=True)
    return out


def control_metric(summary: dict, key: str) -> float | None:
    from mlflow.tracking import MlflowClient

    run_id = summary["stages"][-1].get("run_id")
    if not run_id:
        return None
    metrics = MlflowClient(summary["tracking_uri"]).get_run(run_id).data.metrics
    return metrics.get(key)


def collapsed_layers(out: Path) -> int:
    """Layers the final masks leave without a single weight (layer collapse)."""
    import compresspipe

    return sum(int(not m.any()) for m in compresspipe.load(out / "m").masks.values())


def plan(args) -> list[tuple[str, float, list[dict], int, bool]]:
    """(name, sparsity, stages, epochs, with_dense) of every run of one seed."""
    sparsities = args.sparsities or ([0.9, 0.98] if args.quick else [0.9, 0.95, 0.98, 0.99])
    runs = []
    for s in sparsities:
        for name, (stages, epochs) in methods(s, args.dense_epochs).items():
            if not args.methods or name in args.methods:
                with_dense = stages[0]["prune"]["method"] not in ("bimp", "at_init")
                runs.append((name, s, stages, epochs, with_dense))
    for s in args.extreme or []:  # pruning at init without the collapse guard
        for name, (stages, epochs) in methods(s, args.dense_epochs, ("snip", "synflow"),
                                              floor=False).items():
            if name.endswith("at init"):
                if args.extreme_epochs is not None:  # 0: the masks alone show a collapse
                    epochs = args.extreme_epochs
                    stages[0]["prune"]["train"]["epochs"] = epochs
                runs.append((f"{name}, no floor", s, stages, epochs, False))
    return runs


def _stage_seconds(summary: dict) -> float:
    """The run's stages' own wall times (a resumed run reports what its stages took)."""
    return sum(s["metrics"].get("wall_time_s", 0.0) for s in summary["stages"])


def run_seed(tmp: Path, args, seed: int, rows: dict) -> None:
    import compresspipe

    for name, s, stages, epochs, with_dense in plan(args):
        out = tmp / f"seed{seed}-{name}-{s}"
        if with_dense and not out.exists():
            # its own directory (so a rerun resumes every method), seeded with the seed's
            # dense stage: same trained weights and rewind point for all
            shutil.copytree(dense_run(tmp, args, seed), out)
        summary = compresspipe.run(pipeline(out, args.model, seed, stages, with_dense,
                                            args.dataset, args.dense_epochs), resume=True)
        m = summary["stages"][-1]["metrics"]
        rows.setdefault((name, s), []).append({
            "top1": m["test_top1"], "loss": m["test_loss"], "val_top1": m.get("deployed_val_top1"),
            "epochs": epochs, "wall_s": _stage_seconds(summary),
            "collapsed_layers": collapsed_layers(out)})
        if name.startswith("LTH"):  # the control is evaluated on the validation split
            rows.setdefault(("LTH random re-init control", s), []).append({
                "top1": None, "val_top1": control_metric(summary, "control_top1"),
                "loss": None, "epochs": epochs})
    if args.no_dsd:
        return
    # DSD against dense trained for the same total epochs
    dsd = [{"name": "dsd", "prune": {"method": "dsd", "sparsity": 0.3, "scope": "layer",
                                    "first_layer": "exclude",
                                    "dsd": {"sparse_epochs": 3, "redense_epochs": 3},
                                    "train": {"epochs": 3, "lr": 0.05}}}]
    longer = [{"name": "dense12", "train": {"epochs": args.dense_epochs + 6, "lr": 0.05,
                                            "warmup_epochs": 1}}]
    for name, slug, stages, dense_first in (("DSD (30%)", "dsd", dsd, True),
                                            ("dense, same epochs", "dense12", longer, False)):
        out = tmp / f"seed{seed}-{slug}"
        if dense_first and not out.exists():
            shutil.copytree(dense_run(tmp, args, seed), out)
        summary = compresspipe.run(pipeline(out, args.model, seed, stages, dense_first,
                                            args.dataset, args.dense_epochs), resume=True)
        m = summary["stages"][-1]["metrics"]
        rows.setdefault((name, 0.0), []).append(
            {"top1": m["test_top1"], "loss": m["test_loss"],
             "val_top1": m.get("deployed_val_top1"), "epochs": args.dense_epochs + 6,
             "wall_s": _stage_seconds(summary)})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 sparsities, 1 seed")
    ap.add_argument("--model", default="resnet10t",
                    help="a timm name or a factory, e.g. compresspipe.zoo:lenet_300_100")
    ap.add_argument("--dataset", default="digits", choices=list(DATA))
    ap.add_argument("--dense-epochs", type=int, default=DENSE)
    ap.add_argument("--sparsities", type=float, nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=None, help="only these (names as printed)")
    ap.add_argument("--extreme", type=float, nargs="+", default=None,
                    help="also SNIP and SynFlow at init at these sparsities, without the "
                    "min_layer_keep guard (the layer-collapse claim)")
    ap.add_argument("--extreme-epochs", type=int, default=None,
                    help="training epochs of those runs (default: the others' total; 0 scores "
                    "and prunes only, for the collapse count)")
    ap.add_argument("--no-dsd", action="store_true", help="skip DSD and its dense control")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only-seed", type=int, default=None,
                    help="run just this seed (parallel workers sharing --workdir; a final call "
                    "without it resumes them all and writes the table)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the runs here; a second call resumes them instead of starting over")
    args = ap.parse_args()
    if args.dataset == "fashion_mnist" and not Path(DATA["fashion_mnist"]["root"]).is_dir():
        sys.exit("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    seeds = list(range(1 if args.quick else args.seeds))
    if args.only_seed is not None:
        seeds = [args.only_seed]
    rows: dict[tuple[str, float], list[dict]] = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.workdir or scratch)
        for seed in seeds:
            run_seed(tmp, args, seed, rows)
    report(rows, args, time.time() - started)
    if args.dataset != "digits" and args.only_seed is None:
        claims(rows, args)


def _ms(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def command_line() -> str:
    """How these numbers were made (scratch-directory and worker options left out)."""
    argv, out, skip = sys.argv[1:], [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--workdir", "--only-seed"):
            skip = True
        else:
            out.append(f'"{a}"' if " " in a else a)
    return " ".join(["python benchmarks/pruning_methods.py", *out])


def _tag(args) -> str:
    tag = "" if args.dataset == "digits" else f"_{args.dataset}"
    return tag + ("_quick" if args.quick else "")


def report(rows: dict, args, seconds: float) -> None:
    n = max((len(v) for v in rows.values()), default=0)
    total = sum(v.get("wall_s") or 0 for vals in rows.values() for v in vals)
    lines = [f"model {args.model}, {args.dataset} {DATA[args.dataset]['image_size']} px, "
             f"{n} seed(s); the runs' stages took {total / 60:.0f} min summed over runs, the shared "
             f"dense stage counted in each (this call "
             f"{seconds / 60:.1f} min; a shared 2-core machine, load average ~20)", "",
             "| method | sparsity | test top-1 % (mean ± std) | test loss | val top-1 % | "
             "collapsed layers | epochs | wall s/run |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, s), vals in rows.items():
        walls = [v["wall_s"] for v in vals if v.get("wall_s")]
        lines.append(f"| {name} | {s:.2%} | {_ms([v['top1'] for v in vals])} | "
                     f"{_ms([v['loss'] for v in vals])} | {_ms([v.get('val_top1') for v in vals])} | "
                     f"{max((v.get('collapsed_layers') or 0) for v in vals)} | "
                     f"{vals[0]['epochs']} | {statistics.mean(walls) if walls else 0:.0f} |")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"pruning_methods{_tag(args)}.md").write_text(text + "\n")
    table = [{"method": n, "sparsity": s, "runs": v} for (n, s), v in rows.items()]
    (RESULTS / f"pruning_methods{_tag(args)}.json").write_text(json.dumps(
        table if args.dataset == "digits" else
        {"command": command_line(), "wall_s": total, "rows": table}, indent=1))


def _compare(rows: dict, a: tuple[str, float], b: tuple[str, float], key: str,
             at_least: bool = False) -> dict | None:
    """a − b of the seed means of ``key`` with the Welch standard error, and the verdict:
    beyond 2 SE reproduced / contradicted, else within noise (``at_least``: a ≥ b holds unless
    a is worse by more than 2 SE)."""
    xa = [r[key] for r in rows.get(a, []) if r.get(key) is not None]
    xb = [r[key] for r in rows.get(b, []) if r.get(key) is not None]
    if not xa or not xb:
        return None
    var = lambda x: statistics.variance(x) / len(x) if len(x) > 1 else 0.0  # noqa: E731
    diff, se = statistics.mean(xa) - statistics.mean(xb), (var(xa) + var(xb)) ** 0.5
    if at_least:
        verdict = "contradicted" if diff < -2 * se else "reproduced"
    else:
        verdict = "reproduced" if diff > 2 * se else (
            "contradicted" if diff < -2 * se else "within noise")
    return {"a": a[0], "b": b[0], "sparsity": a[1], "metric": key, "mean_a": statistics.mean(xa),
            "mean_b": statistics.mean(xb), "diff": diff, "se": se, "n": [len(xa), len(xb)],
            "verdict": verdict}


def _collapse(rows: dict, s: float) -> dict | None:
    """Pruning at init: SynFlow keeps every layer alive where SNIP empties one (every seed)."""
    syn, snip = rows.get(("SynFlow at init, no floor", s)), rows.get(("SNIP at init, no floor", s))
    if not syn or not snip:
        return None
    a = [r["collapsed_layers"] for r in syn]
    b = [r["collapsed_layers"] for r in snip]
    hit = sum(x > 0 for x in b)
    verdict = ("contradicted" if max(a) > 0 else "reproduced" if hit == len(b) else
               f"reproduced in {hit} of {len(b)} seeds" if hit else
               "not reached (SNIP keeps every layer too)")
    return {"claim": "SynFlow avoids layer collapse where SNIP does not (layers emptied, "
            "no collapse guard)", "a": "SynFlow", "b": "SNIP", "sparsity": s,
            "metric": "collapsed_layers", "mean_a": statistics.mean(a),
            "mean_b": statistics.mean(b), "diff": statistics.mean(a) - statistics.mean(b),
            "se": 0.0, "n": [len(a), len(b)], "verdict": verdict}


def claims(rows: dict, args) -> None:
    """The seed papers' claims, each a comparison of two rows of this run."""
    high = max(args.sparsities or [0.98])
    checks = [
        ("LTH: the rewound ticket beats the random re-initialisation of its mask",
         ("LTH (late rewind)", high), ("LTH random re-init control", high), "val_top1", False),
        ("Renda et al.: LRW beats FT", ("IMP+LRW", high), ("IMP+FT", high), "top1", False),
        ("Zimmer et al.: ALLR beats FT", ("IMP+ALLR", high), ("IMP+FT", high), "top1", False),
        ("Zimmer et al.: BIMP+ALLR ≥ GMP at the same total epochs", ("BIMP+ALLR", high),
         ("GMP", high), "top1", True),
        ("DSD beats dense training at the same epochs", ("DSD (30%)", 0.0),
         ("dense, same epochs", 0.0), "top1", False),
    ]
    for s in (args.extreme or []) if args.extreme_epochs != 0 else []:
        checks.append((f"SynFlow beats SNIP at init at {s:.1%} (no collapse guard)",
                       ("SynFlow at init, no floor", s), ("SNIP at init, no floor", s), "top1",
                       False))
    out = [c for s in args.extreme or [] if (c := _collapse(rows, s))]
    for claim, a, b, key, at_least in checks:
        c = _compare(rows, a, b, key, at_least)
        if c:
            c["claim"] = claim
            c["collapsed"] = {n: max((r.get("collapsed_layers") or 0) for r in rows[k])
                              for n, k in (("a", a), ("b", b))}
            out.append(c)
    lines = [f"{args.model} on {args.dataset}, {len(next(iter(rows.values())))} seeds; "
             "difference of seed means ± Welch standard error; reproduced / contradicted "
             "beyond 2 SE", "", "| claim | sparsity | A | B | A − B (pt; layers for collapse) | verdict |",
             "|---|---:|---:|---:|---:|---|"]
    for c in out:
        lines.append(f"| {c['claim']} | {c['sparsity']:.2%} | {c['a']} {c['mean_a']:.2f} | "
                     f"{c['b']} {c['mean_b']:.2f} | {c['diff']:+.2f} ± {c['se']:.2f} | "
                     f"{c['verdict']} |")
    lines += ["", "FT retrains at the dense schedule's last learning rate (Renda et al.); after "
              "this benchmark's cosine decay to 0 that LR is ~0, so FT barely retrains and the "
              "LRW/ALLR-vs-FT rows measure retraining against none. The LTH rows compare "
              "validation accuracy (the control is only evaluated there); the rest test top-1. "
              "The collapse rows count layers left without a weight by the at-init masks, "
              "trained or not."]
    text = "\n".join(lines)
    print(text)
    (RESULTS / f"seed_claims{_tag(args)}.md").write_text(text + "\n")
    (RESULTS / f"seed_claims{_tag(args)}.json").write_text(json.dumps(
        {"command": command_line(), "model": args.model, "dataset": args.dataset,
         "claims": out}, indent=1))


if __name__ == "__main__":
    main()
