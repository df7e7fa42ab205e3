"""Why DSD does not beat dense training here: the seed-claims row, taken apart.

The seed-claims benchmark (pruning_methods.py) found DSD (Han et al., 2017) 0.35 pt *behind*
dense training at the same epochs on LeNet-300-100 / Fashion-MNIST. DSD changes two things at
once against that control: a sparse phase (30% per layer, first layer spared), and the learning
rate schedule (its phases restart at the peak LR after the dense cosine has annealed, and the
re-dense phase runs at a tenth of it). Three arms per seed, all from one dense stage:

- ``DSD (30%)``: the method as the paper gives it;
- ``DSD's schedule, nothing pruned``: the same stage at sparsity 0, so the same code, epochs
  and LR restarts without a mask: DSD minus this arm is what the sparse phase itself does;
- ``dense, same epochs``: one cosine schedule over all the epochs (the claim's control).

Two regimes: ``short`` is the seed-claims setting (8 dense epochs + 3 sparse + 3 re-dense);
``long`` trains the dense model until it overfits (train loss well below validation loss),
which is where DSD is claimed to act, as a regulariser. Each final model is evaluated on the
training images too (the generalisation gap). Decisions would use validation; the verdicts
report test top-1, the difference of seed means ± Welch SE, beyond 2 SE.

    .venv/bin/python benchmarks/dsd.py [--quick] [--seeds 3] [--regimes short long] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from deep_compression_lenet import mean_sd
from pruning_methods import DATA, _compare, pipeline

import compresspipe
from compresspipe.core.batches import BatchLoader
from compresspipe.core.config import DataConfig
from compresspipe.core.data import build_data
from compresspipe.core.measure import evaluate

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "compresspipe.zoo:lenet_300_100"
# regime -> (dense epochs, sparse epochs, re-dense epochs)
REGIMES = {"short": (8, 3, 3), "long": (30, 10, 10)}
ARMS = ("DSD (30%)", "DSD's schedule, nothing pruned", "dense, same epochs")
SLUGS = dict(zip(ARMS, ("dsd30", "dsd0", "dense")))


def arm_stages(arm: str, dense: int, sparse: int, redense: int) -> tuple[list[dict], bool]:
    """(stages after the shared dense stage, or a full list; whether the dense stage leads)."""
    if arm == "dense, same epochs":
        return [{"name": "dense_long", "train": {"epochs": dense + sparse + redense, "lr": 0.05,
                                                 "warmup_epochs": 1}}], False
    sparsity = 0.3 if arm == "DSD (30%)" else 0.0
    return [{"name": "dsd", "prune": {"method": "dsd", "sparsity": sparsity, "scope": "layer",
                                      "first_layer": "exclude",
                                      "dsd": {"sparse_epochs": sparse, "redense_epochs": redense},
                                      "train": {"epochs": sparse, "lr": 0.05}}}], True


def train_fit(stage_dir: Path) -> dict[str, float]:
    """Top-1 and loss of a stage's model on the training images (no augmentation: the
    Fashion-MNIST pipelines here have none), for the generalisation gap."""
    bundle = build_data(DataConfig(**DATA["fashion_mnist"]))
    model = compresspipe.load(stage_dir).model
    m = evaluate(model, BatchLoader(bundle.train, 1024))
    return {"train_top1": m["top1"], "train_loss": m["loss"]}


def run_arm(work: Path, regime: str, arm: str, seed: int) -> dict:
    dense, sparse, redense = REGIMES[regime]
    stages, dense_first = arm_stages(arm, dense, sparse, redense)
    shared = work / f"{regime}-seed{seed}-dense"
    # resume: a finished run is read, an interrupted one completed before it is copied
    compresspipe.run(pipeline(shared, MODEL, seed, [], True, "fashion_mnist", dense),
                     resume=True)
    out = work / f"{regime}-seed{seed}-{SLUGS[arm]}"
    if dense_first and not out.exists():
        shutil.copytree(shared, out)
    summary = compresspipe.run(pipeline(out, MODEL, seed, stages, dense_first, "fashion_mnist",
                                        dense), resume=True)
    by = {s["name"]: s["metrics"] for s in summary["stages"]}
    last = by[stages[0]["name"]]
    row = {"seed": seed, "top1": last["test_top1"], "loss": last["test_loss"],
           "val_top1": last.get("deployed_val_top1"), "epochs": dense + sparse + redense,
           "wall_s": sum(m.get("wall_time_s", 0.0) for m in by.values()),
           **train_fit(out / stages[0]["name"])}
    if dense_first:  # the dense starting point's own fit, once per seed (same in both DSD arms)
        start = train_fit(shared / "dense")
        row.update(dense_top1=by["dense"]["test_top1"], dense_loss=by["dense"]["test_loss"],
                   dense_train_loss=start["train_loss"], dense_train_top1=start["train_top1"])
    return row


def report(rows: dict[tuple[str, str], list[dict]], seconds: float) -> tuple[str, list[dict]]:
    n = max(len(v) for v in rows.values())
    lines = [f"{MODEL} on Fashion-MNIST 28 px (54,000 train / 6,000 val / 10,000 test), {n} "
             f"seeds, batch 128, peak LR 0.05, one torch thread; this call {seconds / 60:.0f} "
             "min on a 2-core machine shared with another benchmark", "",
             "| regime (dense + sparse + re-dense epochs) | arm | test top-1 % | test loss | "
             "val top-1 % | train top-1 % | train loss | gap: test − train loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (regime, arm), vals in rows.items():
        gap = [v["loss"] - v["train_loss"] for v in vals]
        lines.append(f"| {regime} ({'+'.join(map(str, REGIMES[regime]))}) | {arm} | "
                     f"{mean_sd([v['top1'] for v in vals])} | {mean_sd([v['loss'] for v in vals], 4)} | "
                     f"{mean_sd([v['val_top1'] for v in vals])} | "
                     f"{mean_sd([v['train_top1'] for v in vals])} | "
                     f"{mean_sd([v['train_loss'] for v in vals], 4)} | {mean_sd(gap, 4)} |")
    for regime in REGIMES:
        start = rows.get((regime, ARMS[0]))
        if start:
            lines.append(f"| {regime} | the dense start (after {REGIMES[regime][0]} epochs) | "
                         f"{mean_sd([v['dense_top1'] for v in start])} | "
                         f"{mean_sd([v['dense_loss'] for v in start], 4)} | | "
                         f"{mean_sd([v['dense_train_top1'] for v in start])} | "
                         f"{mean_sd([v['dense_train_loss'] for v in start], 4)} | "
                         f"{mean_sd([v['dense_loss'] - v['dense_train_loss'] for v in start], 4)} |")
    verdicts = []
    for regime in REGIMES:
        keyed = {arm: rows.get((regime, arm), []) for arm in ARMS}
        if not all(keyed.values()):
            continue
        for what, a, b in (("DSD beats dense training at the same epochs (the claim)", ARMS[0],
                            ARMS[2]),
                           ("the sparse phase itself (DSD against its own schedule unpruned)",
                            ARMS[0], ARMS[1]),
                           ("DSD's schedule against one cosine (nothing pruned in either)",
                            ARMS[1], ARMS[2])):
            c = _compare({(a, 0.0): keyed[a], (b, 0.0): keyed[b]}, (a, 0.0), (b, 0.0), "top1")
            c.update(regime=regime, question=what)
            verdicts.append(c)
    lines += ["", "| regime | question | A − B, test top-1 (pt) | verdict |", "|---|---|---:|---|"]
    lines += [f"| {c['regime']} | {c['question']} | {c['diff']:+.2f} ± {c['se']:.2f} | "
              f"{c['verdict']} |" for c in verdicts]
    return "\n".join(lines), verdicts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, the short regime only")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--workdir", type=Path, default=None, help="keep runs here (resumable)")
    ap.add_argument("--only-seed", type=int, default=None,
                    help="run just this seed (parallel workers sharing --workdir; a final call "
                    "without it resumes them all and writes the table)")
    args = ap.parse_args()
    if not Path(DATA["fashion_mnist"]["root"]).is_dir():
        sys.exit("Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    if args.quick:
        args.seeds, args.regimes = 1, ["short"]
    seeds = [args.only_seed] if args.only_seed is not None else list(range(args.seeds))
    rows: dict[tuple[str, str], list[dict]] = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        for regime in args.regimes:
            for seed in seeds:
                for arm in ARMS:
                    row = run_arm(work, regime, arm, seed)
                    print(json.dumps({"regime": regime, "arm": arm, **row}), flush=True)
                    rows.setdefault((regime, arm), []).append(row)
    if args.only_seed is not None:
        return
    text, verdicts = report(rows, time.time() - started)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    tag = "_quick" if args.quick else ""
    (RESULTS / f"dsd_fashion_mnist{tag}.md").write_text(text + "\n")
    (RESULTS / f"dsd_fashion_mnist{tag}.json").write_text(json.dumps(
        {"command": f"python benchmarks/dsd.py --seeds {args.seeds} --regimes "
                    f"{' '.join(args.regimes)}", "quick": args.quick,
         "threads": os.environ.get("OMP_NUM_THREADS"),
         "verdicts": verdicts,
         "rows": {f"{r} / {a}": v for (r, a), v in rows.items()}}, indent=1))


if __name__ == "__main__":
    main()
