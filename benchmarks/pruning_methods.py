"""Pruning methods: accuracy and loss at several sparsities, mean ± std over seeds, epochs spent.
Every number is measured by the pipeline on the model reloaded from its artifact file.

    .venv/bin/python benchmarks/pruning_methods.py [--quick] [--model resnet10t] [--seeds 3]
    .venv/bin/python benchmarks/pruning_methods.py --dataset fashion_mnist \
        --model compresspipe.zoo:lenet_300_100 --sparsities 0.98 --extreme 0.998

On Fashion-MNIST the seed papers' claims are checked from the numbers (seed_claims.{json,md}):
each claim's difference of seed means against its standard error (Welch), as distill does.

``--structured R`` instead compares channel pruning methods at the same MACs budget (R of the
dense MACs removed), all from the seed's dense stage: PaS (search, then fine-tuning) against
uniform and global L1 filter pruning fine-tuned for the same epochs as PaS's fine-tuning, and
uniform L1 fine-tuned for PaS's search + fine-tuning epochs (the same total). Results:
pas_vs_uniform_<dataset>_<N>x.{json,md} (N: the MACs reduction), verdicts as above.

    .venv/bin/python benchmarks/pruning_methods.py --dataset fashion_mnist \
        --model compresspipe.zoo:lenet_5 --structured 0.5 --limit-train 12000

All methods of one seed start from the same dense stage (trained once, copied into each method's
directory and reused through --resume's fingerprints); every method keeps its own directory, so a
second call with the same --workdir resumes instead of recomputing.
"""

from __future__ import annotations

import argparse
import json
import os
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
LIMITS: dict[str, int] = {}  # data.limit_train from --limit-train (a subset of the train split)
TRACKING_OFF: list[bool] = []  # --structured: no MLflow (non-empty: off)


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


def structured_methods(ratio: float, search: int, finetune: int,
                       lr: float) -> dict[str, tuple[list[dict], int]]:
    """name -> (stages after the dense stage, epochs after it) at ``ratio`` of the MACs removed.
    Search and fine-tuning start at ``lr`` (below the dense peak: a search restarted at the peak
    destroys the trained weights it is meant to rank), linear decay."""
    train = lambda epochs: {"epochs": epochs, "lr": lr, "schedule": "linear"}  # noqa: E731
    l1 = lambda scope, epochs: [{"name": "m", "channel_prune": {  # noqa: E731
        "criterion": "l1", "target": "macs", "ratio": ratio, "scope": scope,
        "train": train(epochs), "latency": None}}]
    return {
        "PaS": ([{"name": "m", "pas": {"p": ratio, "alpha": 0.1, "latency": None,
                                       "search": train(search), "finetune": train(finetune)}}],
                search + finetune),
        # a tenth of the budget's pull: does a weaker pull let the cross-entropy spread the cut?
        "PaS, alpha 0.01": ([{"name": "m", "pas": {"p": ratio, "alpha": 0.01, "latency": None,
                                                   "search": train(search),
                                                   "finetune": train(finetune)}}],
                            search + finetune),
        "uniform L1": (l1("uniform", finetune), finetune),
        "global L1": (l1("global", finetune), finetune),
        "uniform L1, same total epochs": (l1("uniform", search + finetune), search + finetune),
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
    # --structured reads its numbers from the artifacts, not from MLflow (the LTH control does)
    tracking = {"tracking": {"enabled": False}} if TRACKING_OFF else {}
    return {"name": "bench", "seed": seed, "output_dir": str(out), "model": model_block(model),
            **tracking,
            "data": {**DATA[dataset], **LIMITS},
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
    if args.structured is not None:
        return [(name, args.structured, stages, epochs, True) for name, (stages, epochs) in
                structured_methods(args.structured, args.search_epochs, args.finetune_epochs,
                                   args.finetune_lr).items()
                if not args.methods or name in args.methods]
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


def structured_record(stage_dir: Path) -> dict:
    """MACs, parameters and (PaS) the searched and final widths of a structured stage."""
    record = json.loads((stage_dir / "artifact.json").read_text())["meta"]["structured"]["m"]
    out = {"macs": record["macs"], "macs_dense": record["macs_before"],
           "params": record["params_after"],
           "widths": [r.get("kept", r.get("out")) for r in record["layer_widths"]]}
    if "searched_widths" in record:
        out["searched_widths"] = [w["kept"] for w in record["searched_widths"]]
        out["searched_macs_ratio"] = record["searched_macs_ratio"]
    return out


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
        row = {"top1": m["test_top1"], "loss": m["test_loss"],
               "val_top1": m.get("deployed_val_top1"), "epochs": epochs,
               "wall_s": _stage_seconds(summary)}
        if args.structured is None:
            row["collapsed_layers"] = collapsed_layers(out)
        else:
            row.update(structured_record(out / "m"))
            row["dense_top1"] = next(st["metrics"]["test_top1"] for st in summary["stages"]
                                     if st["name"] == "dense")
        rows.setdefault((name, s), []).append(row)
        if name.startswith("LTH"):  # the control is evaluated on the validation split
            rows.setdefault(("LTH random re-init control", s), []).append({
                "top1": None, "val_top1": control_metric(summary, "control_top1"),
                "loss": None, "epochs": epochs})
    if args.no_dsd or args.structured is not None:
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
    ap.add_argument("--structured", type=float, default=None, metavar="R",
                    help="channel pruning instead: PaS vs uniform / global L1 at R of the "
                    "dense MACs removed")
    ap.add_argument("--search-epochs", type=int, default=3, help="--structured: PaS search")
    ap.add_argument("--finetune-epochs", type=int, default=5,
                    help="--structured: fine-tuning after the removal, every method")
    ap.add_argument("--finetune-lr", type=float, default=0.01,
                    help="--structured: starting lr of search and fine-tuning")
    ap.add_argument("--limit-train", type=int, default=None,
                    help="train on a fixed subset of this many images (the split is unchanged)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only-seed", type=int, default=None,
                    help="run just this seed (parallel workers sharing --workdir; a final call "
                    "without it resumes them all and writes the table)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the runs here; a second call resumes them instead of starting over")
    args = ap.parse_args()
    if args.dataset == "fashion_mnist" and not Path(DATA["fashion_mnist"]["root"]).is_dir():
        sys.exit("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    if args.limit_train:
        LIMITS["limit_train"] = args.limit_train
    if args.structured is not None:
        TRACKING_OFF.append(True)
    seeds = list(range(1 if args.quick else args.seeds))
    if args.only_seed is not None:
        seeds = [args.only_seed]
    rows: dict[tuple[str, float], list[dict]] = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.workdir or scratch)
        for seed in seeds:
            run_seed(tmp, args, seed, rows)
    if args.structured is not None:
        if args.only_seed is None:
            structured_report(rows, args, time.time() - started)
        return
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


def structured_report(rows: dict, args, seconds: float) -> None:
    """PaS against L1 channel pruning at the same MACs: table, verdicts, JSON."""
    n = max(len(v) for v in rows.values())
    total = sum(v.get("wall_s") or 0 for vals in rows.values() for v in vals)
    data = f"{args.dataset} 28 px" + (f", train subset {args.limit_train:,} images"
                                      if args.limit_train else "")
    lines = [f"{args.model} on {data}, {n} seeds, {args.structured:.0%} of the dense MACs "
             f"removed; search {args.search_epochs} + fine-tune {args.finetune_epochs} epochs "
             f"from lr {args.finetune_lr} (linear decay); runs' stages took {total / 60:.0f} min "
             f"summed (this call {seconds / 60:.1f} min; a shared 2-core machine)", "",
             "| method | MACs (mean) | params | test top-1 % (mean ± std) | val top-1 % | "
             "epochs after dense | widths, seed 0 (searched) | wall s/run |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    first = next(iter(rows.values()))
    dense = [v["dense_top1"] for v in first]
    for (name, _), vals in rows.items():
        v0 = vals[0]
        widths = "/".join(map(str, v0["widths"])) + (
            f" ({'/'.join(map(str, v0['searched_widths']))})" if "searched_widths" in v0 else "")
        lines.append(f"| {name} | {statistics.mean(v['macs'] for v in vals) / 1e6:.3f}M of "
                     f"{v0['macs_dense'] / 1e6:.3f}M | {statistics.mean(v['params'] for v in vals):,.0f} | "
                     f"{_ms([v['top1'] for v in vals])} | {_ms([v['val_top1'] for v in vals])} | "
                     f"{v0['epochs']} | {widths} | "
                     f"{statistics.mean(v['wall_s'] for v in vals):.0f} |")
    lines.append(f"| dense (start of every run) | {first[0]['macs_dense'] / 1e6:.3f}M | | "
                 f"{_ms(dense)} | | | | |")
    out = []
    s = args.structured
    for claim, a, b, at_least in (
            ("PaS beats uniform L1 at the same MACs (same fine-tuning epochs)", "PaS",
             "uniform L1", False),
            ("PaS beats uniform L1 at the same MACs (same total epochs)", "PaS",
             "uniform L1, same total epochs", False),
            ("PaS ≥ global L1 at the same MACs (same fine-tuning epochs)", "PaS", "global L1",
             True),
            ("PaS with alpha 0.01 beats uniform L1 at the same MACs (same total epochs)",
             "PaS, alpha 0.01", "uniform L1, same total epochs", False)):
        c = _compare(rows, (a, s), (b, s), "top1", at_least)
        if c:
            out.append({**c, "claim": claim})
    lines += ["", "| claim | PaS | other | PaS − other (pt, ± Welch SE) | verdict |",
              "|---|---:|---:|---:|---|"]
    lines += [f"| {c['claim']} | {c['a']} {c['mean_a']:.2f} | {c['b']} {c['mean_b']:.2f} | "
              f"{c['diff']:+.2f} ± {c['se']:.2f} | {c['verdict']} |" for c in out]
    lines += ["", "Widths: kept output channels/units of every layer, the classifier last. "
              "Reproduced / contradicted: beyond 2 standard errors of the seed means."]
    text = "\n".join(lines)
    print(text)
    name = f"pas_vs_uniform_{args.dataset}_{round(1 / (1 - args.structured))}x"
    (RESULTS / f"{name}.md").write_text(text + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"command": command_line(), "wall_s": total, "claims": out,
         "machine": f"{os.cpu_count()} CPU cores shared with other jobs, torch 1 thread",
         "rows": [{"method": k, "macs_removed": r, "runs": v} for (k, r), v in rows.items()]},
        indent=1))


if __name__ == "__main__":
    main()
