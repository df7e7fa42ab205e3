"""How the allocation rules split one global sparsity target, one-shot (no retraining): a dense
network trained by a pipeline (dense train stage, then a sensitivity stage), then every rule
(uniform, global, erk, lamp, sensitivity) prunes it by magnitude to each target; validation
top-1/loss decide, test top-1 is reported. Also the spread of per-layer sparsities and the
layers where the min_layer_keep floor binds.

    .venv/bin/python benchmarks/allocation.py [--quick] [--model resnet10t] [--epochs 6]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from compresspipe.compress.pruning.scopes import compute_masks, floor_bound, select_targets
from compresspipe.compress.sensitivity import loss_curves, validation_batches
from compresspipe.core import artifact_keys
from compresspipe.core.artifact import Artifact
from compresspipe.core.data import build_data
from compresspipe.core.masks import apply_masks
from compresspipe.core.measure import evaluate
from compresspipe.pipeline.loader import load_pipeline
from compresspipe.pipeline.runner import run_pipeline

RESULTS = Path(__file__).resolve().parent / "results"
RULES = ["uniform", "global", "erk", "lamp", "sensitivity"]


def pipeline(out: Path, model: str, epochs: int, size: int) -> dict:
    return {
        "name": "allocation", "seed": 0, "output_dir": str(out), "device": "cpu",
        "tracking": {"enabled": False}, "model": {"name": model},
        "data": {"name": "digits", "image_size": size, "batch_size": 64, "augment": True},
        "stages": [
            {"name": "dense", "train": {"epochs": epochs, "lr": 0.05, "schedule": "cosine",
                                        "warmup_epochs": 1}},
            {"name": "sens", "sensitivity": {"sparsities": [0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99],
                                             "bits": [], "max_batches": 4}},
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    epochs, size = (2, 16) if args.quick else (args.epochs, args.size)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.yaml"
        path.write_text(json.dumps(pipeline(Path(tmp) / "run", args.model, epochs, size)))
        loaded = load_pipeline(path)
        run_pipeline(loaded)
        artifact = Artifact.load(Path(tmp) / "run" / "sens")
    record = artifact_keys.sensitivity(artifact)
    data = build_data(loaded.config.data)
    val, split = validation_batches(data, 10_000)
    test = data.test_loader()
    dense = {"val": evaluate(artifact.model, val), "test_top1": evaluate(artifact.model, test)["top1"]}
    rows = []
    for target in (0.9, 0.95, 0.98, 0.99):
        for rule in RULES:
            rows.append(one_rule(artifact, rule, target, record, val, test))
            r = rows[-1]
            print(f"{target:.2f} {rule:12s} val top1 {r['val_top1']:6.2f}  test top1 "
                  f"{r['test_top1']:6.2f}  layer sparsity {r['min_layer']:.3f}..{r['max_layer']:.3f}"
                  f"  floor-bound {r['floor_bound']}", flush=True)
    result = {"model": args.model, "image_size": size, "epochs": epochs, "split": split,
              "val_images": sum(len(y) for _, y in val), "dense": dense, "rows": rows,
              "wall_s": time.perf_counter() - started, "quick": args.quick,
              "note": "one-shot magnitude pruning, no retraining; shared machine"}
    name = "allocation_quick" if args.quick else "allocation"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    if not args.quick:
        (RESULTS / f"{name}.md").write_text(table(result))
    print(table(result))


def one_rule(artifact: Artifact, rule: str, target: float, record: dict, val, test) -> dict:
    model = copy.deepcopy(artifact.model)
    targets = select_targets(model, [], [], "include", "include", {}, min_keep=0.01)
    targets.allocation, targets.curves = rule, loss_curves(record)
    params = dict(model.named_parameters())
    masks = compute_masks({n: params[n].detach().abs() for n in targets.names}, targets, target,
                          "global")
    apply_masks(model, masks)
    per_layer = {n: 1 - m.float().mean().item() for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    v = evaluate(model, val)
    return {"rule": rule, "target": target, "val_top1": v["top1"], "val_loss": v["loss"],
            "test_top1": evaluate(model, test)["top1"],
            "pruned": sum(int((~m).sum()) for m in masks.values()), "weights": total,
            "exact": sum(int((~m).sum()) for m in masks.values()) == round(target * total),
            "min_layer": min(per_layer.values()), "max_layer": max(per_layer.values()),
            "floor_bound": len(floor_bound(masks, targets)), "layers": len(masks)}


def table(result: dict) -> str:
    lines = [f"{result['model']} on digits {result['image_size']} px, {result['epochs']} dense "
             f"epochs; one-shot magnitude pruning, no retraining; decisions on the "
             f"{result['split']} split ({result['val_images']} images), test reported. Dense: "
             f"val top-1 {result['dense']['val']['top1']:.2f}%, test top-1 "
             f"{result['dense']['test_top1']:.2f}%.", "",
             "| target | rule | val top-1 | val loss | test top-1 | per-layer sparsity | "
             "floor-bound layers | exact |", "|---:|---|---:|---:|---:|---|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['target']:.2f} | {r['rule']} | {r['val_top1']:.2f} | "
                     f"{r['val_loss']:.3f} | {r['test_top1']:.2f} | {r['min_layer']:.3f}–"
                     f"{r['max_layer']:.3f} | {r['floor_bound']}/{r['layers']} | "
                     f"{'yes' if r['exact'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
