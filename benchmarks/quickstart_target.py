"""The quickstart's target: its ``.cpz`` ≥ 100× smaller than the fp32 file at ≤ 0.5 pt test top-1
loss against its own dense stage, same machine and seed (issue 16), over several seeds.

    .venv/bin/python benchmarks/quickstart_target.py [--seeds 0 1] [--workdir DIR] [--threads 1]
        [--pipeline FILE] [--set PATH=VALUE ...] [--dataset fashion_mnist [--limit-train N]]

``--dataset fashion_mnist`` runs the same pipeline on Fashion-MNIST at 28 px (the issue's
"resnet18 on Fashion-MNIST" target; 10,000 test images, 1 image = 0.01 pt), results in
``quickstart_target_fashion_mnist.*``; ``--limit-train`` trains on a fixed subset.

Each seed runs the shipped quickstart (``compresspipe run``, a fresh process, ``--no-cache`` so
that every stage is trained, not reused) into ``<workdir>/seed<N>`` (``<dataset>-seed<N>``
for another data set); a seed whose directory already holds a finished run is read, not rerun
(``--workdir`` keeps them; other ``--set`` values need another workdir). Numbers:
- fp32 bytes: the dense stage's ``model.safetensors`` as measured by the runner;
- ``.cpz`` bytes: ``huffman/model.cpz`` on disk (``stat``), the file the export stage ships;
- accuracy: each stage's model reloaded from disk, on the test split (reported; digits: 360
  images, 1 = 0.28 pt) and the validation split (what settings were chosen on); loss = dense
  test top-1 − ``.cpz`` test top-1;
- wall time: the sum of the stages' wall times of the run (the machine may be shared: see
  ``load``, the 1-minute load average before and after each run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PIPELINE = ROOT / "compresspipe" / "pipelines" / "quickstart.yaml"
TARGET_RATIO, TARGET_LOSS_PT = 100.0, 0.5
# --dataset -> the overrides that put the quickstart on it, and its test split in words
DATASETS = {
    "digits": ([], "Test split: 360 digits (1 image = 0.28 pt)"),
    "fashion_mnist": (["data.name=fashion_mnist", "data.image_size=28",
                       "tracking.register.name=quickstart-fashion-mnist"],
                      "Test split: Fashion-MNIST's 10,000 images (1 image = 0.01 pt)"),
}


def finished(out: Path) -> dict | None:
    """The run's summary when every stage completed, else None."""
    path = out / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("status") == "finished" else None


def run_seed(pipeline: Path, seed: int, out: Path, sets: list[str], threads: int) -> dict:
    """Run (or read) one seed; the row of numbers it gives."""
    summary, load = finished(out), [os.getloadavg()[0]]
    ran = summary is None
    if ran:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "compresspipe", "run", str(pipeline), "--no-cache",
               "--set", f"output_dir={out}", "--set", f"seed={seed}"]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, env=env, check=True, cwd=ROOT)
        load.append(os.getloadavg()[0])
        summary = finished(out)
        if summary is None:
            raise SystemExit(f"{out}: the run did not complete")
    by = {s["name"]: s["metrics"] for s in summary["stages"]}
    # the pruning stage, whatever its name ("ticket" while the quickstart was a lottery ticket)
    pruned = next(s["name"] for s in summary["stages"] if s["type"] == "prune")
    fp32, cpz = by["dense"]["model_bytes"], (out / "huffman" / "model.cpz").stat().st_size
    row = {"seed": seed, "fp32_bytes": int(fp32), "cpz_bytes": cpz, "ratio": fp32 / cpz,
           "wall_s": sum(m.get("wall_time_s", 0.0) for m in by.values()), "load": load,
           "ran_here": ran, "output_dir": str(out),
           # stages a run took from the stage cache (their wall time is the first run's)
           "reused_stages": [s["name"] for s in summary["stages"] if s.get("cached_from_run")]}
    for key, stage in (("dense", "dense"), ("pruned", pruned), ("cluster", "cluster"),
                       ("huffman", "huffman")):
        row[f"{key}_test_top1"] = by[stage]["test_top1"]
        row[f"{key}_test_loss"] = by[stage]["test_loss"]
        row[f"{key}_val_top1"] = by[stage].get("deployed_val_top1")
        row[f"{key}_val_loss"] = by[stage].get("deployed_val_loss")
    row["sparsity"] = by["huffman"]["sparsity"]
    row["loss_pt"] = row["dense_test_top1"] - row["huffman_test_top1"]
    row["met"] = row["ratio"] >= TARGET_RATIO and row["loss_pt"] <= TARGET_LOSS_PT
    return row


def table(rows: list[dict], sets: list[str], test_split: str) -> str:
    lines = ["| seed | dense val / test top-1 | pruned val / test | .cpz val / test top-1 | loss (pt) "
             "| .cpz bytes | vs fp32 | wall s | target |", "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['dense_val_top1']:.2f} / {r['dense_test_top1']:.2f} | "
            f"{r['pruned_val_top1']:.2f} / {r['pruned_test_top1']:.2f} | {r['huffman_val_top1']:.2f} / "
            f"{r['huffman_test_top1']:.2f} | {r['loss_pt']:+.2f} | {r['cpz_bytes']:,} | "
            f"{r['ratio']:.2f}× | {r['wall_s']:.0f} | {'met' if r['met'] else 'MISSED'} |")
    mean_loss = statistics.mean(r["loss_pt"] for r in rows)
    mean_ratio = statistics.mean(r["ratio"] for r in rows)
    lines += ["", f"Mean over {len(rows)} seed(s): {mean_ratio:.2f}× at {mean_loss:+.2f} pt "
              f"(target ≥ {TARGET_RATIO:.0f}× at ≤ {TARGET_LOSS_PT} pt on every seed: "
              f"{'met' if all(r['met'] for r in rows) else 'MISSED'}). {test_split}; settings "
              "chosen on the validation split only."
              + (f" Overrides: {' '.join(sets)}." if sets else "")]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--pipeline", type=Path, default=PIPELINE)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="PATH=VALUE",
                    help="passed to compresspipe run (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep runs here; finished seeds are read instead of rerun")
    ap.add_argument("--dataset", choices=list(DATASETS), default="digits")
    ap.add_argument("--limit-train", type=int, default=None,
                    help="train on a fixed subset of this many images (after the split)")
    args = ap.parse_args()
    dataset_sets, test_split = DATASETS[args.dataset]
    sets = dataset_sets + args.sets + (
        [f"data.limit_train={args.limit_train}"] if args.limit_train else [])
    with tempfile.TemporaryDirectory() as scratch:
        work = args.workdir or Path(scratch)
        rows = []
        for seed in args.seeds:
            # one directory per data set: a finished run is read back, never another set's
            name = f"seed{seed}" if args.dataset == "digits" else f"{args.dataset}-seed{seed}"
            rows.append(run_seed(args.pipeline, seed, work / name, sets,
                                 args.threads))
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows, sets, test_split)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    tag = "" if args.dataset == "digits" else f"_{args.dataset}"
    (RESULTS / f"quickstart_target{tag}.md").write_text(text + "\n")
    (RESULTS / f"quickstart_target{tag}.json").write_text(json.dumps({
        "command": "python benchmarks/quickstart_target.py --seeds "
                   + " ".join(map(str, args.seeds))
                   + (f" --dataset {args.dataset}" if tag else "")
                   + (f" --limit-train {args.limit_train}" if args.limit_train else "")
                   + "".join(f" --set {s}" for s in args.sets)
                   + (f" --workdir {args.workdir}" if args.workdir else ""),
        "pipeline": str(args.pipeline.relative_to(ROOT)) if args.pipeline.is_relative_to(ROOT)
        else str(args.pipeline),
        "threads": args.threads, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        "shared with other jobs (see each row's load)", "cpus": os.cpu_count(),
        "target": {"ratio": TARGET_RATIO, "loss_pt": TARGET_LOSS_PT},
        "met": all(r["met"] for r in rows), "runs": rows,
        "wall_s": sum(r["wall_s"] for r in rows), "measured_at": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n")


if __name__ == "__main__":
    main()
