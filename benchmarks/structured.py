"""Structured pruning benchmark: real CPU speed-ups from removing channels, and PaS vs uniform L1.

Part 1 — for each family the issue names, train a dense model on digits, then prune it to 2x
and 4x fewer MACs (``channel_prune``: L1 filter norm, global ranking — and for ResNet also the
same fraction of every layer — one step) and fine-tune. Reported:
parameters and MACs (counted on the reloaded model), test top-1 after fine-tuning, and the
measured CPU latency speed-up against the dense model at batch 1 and batch 32. Latency is the
median over interleaved rounds (dense, pruned, dense, ...) timed in the same process by the
stage itself, with torch fixed to ``--threads`` intra-op threads (default 1: the machine is
shared with other jobs, and one thread keeps the timings comparable).

Part 2 — PaS (search + fine-tuning) against uniform L1 channel pruning (fine-tuning for the same
total number of epochs) at the same MACs budget (2x fewer), three seeds, same dense start.

Every number comes from pipelines run with ``compresspipe.run``; artifacts stay under
``--out`` (default runs/bench_structured). Results: benchmarks/results/structured[_quick].json.

Run: .venv/bin/python benchmarks/structured.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from safetensors.torch import save_model  # noqa: E402

import compresspipe  # noqa: E402
from compresspipe.core.artifact import Artifact  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# family -> (timm model, kwargs, image size, dense training settings); ResNet also uniform

SGD = {"optimizer": "sgd", "lr": 0.05, "warmup_epochs": 0.5}
ADAM = {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.05, "warmup_epochs": 1}
FAMILIES = {
    "ResNet": ("resnet18", {}, 64, SGD),  # 128 px in the full run: convolutions dominate
    "MobileNetV3": ("mobilenetv3_small_050", {}, 32, SGD),
    "EfficientNet": ("test_efficientnet", {}, 32, SGD),
    "ConvNeXt": ("test_convnext", {}, 32, SGD),
    "ViT": ("test_vit", {"patch_size": 4, "num_heads": 4, "img_size": 32}, 32, ADAM),
}
PAS_MODEL = ("resnet10t", {}, 32, SGD)
SCOPES = {"ResNet": ("global", "uniform")}


def settings(quick: bool) -> dict:
    if quick:
        return {"dense": {"ResNet": 2, "ViT": 10}, "dense_default": 3, "finetune": 1,
                "image_size": {"ResNet": 64},
                "pas_search": 2, "pas_finetune": 1, "pas_dense": 2, "seeds": [0, 1, 2],
                "repeats": 5, "rounds": 3}
    return {"dense": {"ResNet": 8, "ViT": 15}, "dense_default": 8, "finetune": 3,
            "image_size": {"ResNet": 128},
            "pas_search": 3, "pas_finetune": 3, "pas_dense": 6, "seeds": [0, 1, 2],
            "repeats": 10, "rounds": 5}


def pipeline(name: str, out: Path, model: tuple, stages: list, seed: int = 0,
             checkpoint: Path | None = None) -> dict:
    timm_name, kwargs, size, _ = model
    model_cfg = {"name": timm_name, "kwargs": kwargs}
    if checkpoint is not None:
        model_cfg["checkpoint"] = str(checkpoint)
    return {"name": name, "seed": seed, "output_dir": str(out / name), "model": model_cfg,
            "data": {"name": "digits", "image_size": size, "batch_size": 64},
            "tracking": {"enabled": False}, "stages": stages}


def run(cfg: dict) -> tuple[dict, dict]:
    """Run a pipeline; return the last stage's metrics and its structured-pruning record."""
    summary = compresspipe.run(cfg)
    last = summary["stages"][-1]
    artifact = json.loads((Path(cfg["output_dir"]) / last["name"] / "artifact.json").read_text())
    return last["metrics"], artifact["meta"].get("structured", {}).get(last["name"], {})


def finetune(epochs: int, train: dict) -> dict:
    lr = train["lr"] / 5
    return {"epochs": epochs, "optimizer": train["optimizer"], "lr": lr,
            "weight_decay": train.get("weight_decay", 5e-4)}


def dense_model(family: str, model: tuple, epochs: int, out: Path) -> tuple[Path, float]:
    train = {"epochs": epochs, **model[3]}
    metrics, _ = run(pipeline(f"{family}-dense", out, model, [{"name": "dense", "train": train}]))
    # the runner keeps tensors in its store: write the dense weights as a checkpoint file
    checkpoint = out / f"{family}-dense" / "dense.safetensors"
    save_model(Artifact.load(out / f"{family}-dense" / "dense").model, str(checkpoint))
    return checkpoint, metrics["test_top1"]


def speedups(family: str, model: tuple, cfg: dict, out: Path, threads: int) -> list[dict]:
    epochs = cfg["dense"].get(family, cfg["dense_default"])
    checkpoint, dense_top1 = dense_model(family, model, epochs, out)
    rows = []
    for scope in SCOPES.get(family, ("global",)):
        for ratio in (0.5, 0.75):
            rows.append(_pruned(family, model, scope, ratio, checkpoint, dense_top1, cfg, out,
                                threads))
            print(_row(rows[-1]), flush=True)
    return rows


def _pruned(family: str, model: tuple, scope: str, ratio: float, checkpoint: Path,
            dense_top1: float, cfg: dict, out: Path, threads: int) -> dict:
    stage = {"criterion": "l1", "target": "macs", "ratio": ratio, "scope": scope,
             "train": finetune(cfg["finetune"], model[3]),
             "latency": {"batch_sizes": [1, 32], "repeats": cfg["repeats"],
                         "rounds": cfg["rounds"], "threads": threads}}
    tag = f"{family}-{scope}-{int(1 / (1 - ratio))}x"
    metrics, record = run(pipeline(tag, out, model, [{"name": "prune", "channel_prune": stage}],
                                   checkpoint=checkpoint))
    return {"family": family, "model": model[0], "image_size": model[2], "scope": scope,
            "macs_reduction_target": round(1 / (1 - ratio)), "dense_top1": dense_top1,
            "params_dense": record["params_before"], "params": record["params_after"],
            "macs_dense": record["macs_before"], "macs": record["macs"],
            "macs_reduction": record["macs_reduction"], "top1": metrics["test_top1"],
            "speedup_b1": record["speedup_b1"], "speedup_b32": record["speedup_b32"],
            "latency_b1_ms": record["latency_b1_ms"],
            "latency_b1_dense_ms": record["latency_b1_before_ms"],
            "latency_b32_ms": record["latency_b32_ms"],
            "latency_b32_dense_ms": record["latency_b32_before_ms"]}


def pas_vs_uniform(cfg: dict, out: Path) -> list[dict]:
    checkpoint, _ = dense_model("PaS-base", PAS_MODEL, cfg["pas_dense"], out)
    train = PAS_MODEL[3]
    total = cfg["pas_search"] + cfg["pas_finetune"]
    rows = []
    for seed in cfg["seeds"]:
        pas = {"p": 0.5, "alpha": 0.1, "latency": None,
               "search": {"epochs": cfg["pas_search"], **{k: v for k, v in train.items()
                                                           if k != "warmup_epochs"}},
               "finetune": finetune(cfg["pas_finetune"], train)}
        metrics, record = run(pipeline(f"pas-s{seed}", out, PAS_MODEL, [{"name": "pas",
                                                                          "pas": pas}],
                                       seed=seed, checkpoint=checkpoint))
        rows.append({"method": "PaS", "seed": seed, "top1": metrics["test_top1"],
                     "macs": record["macs"], "macs_dense": record["macs_before"],
                     "params": record["params_after"],
                     "searched_macs_ratio": record["searched_macs_ratio"]})
        print(rows[-1], flush=True)
        uniform = {"criterion": "l1", "target": "macs", "ratio": 0.5, "scope": "uniform",
                   "train": finetune(total, train), "latency": None}
        metrics, record = run(pipeline(f"l1u-s{seed}", out, PAS_MODEL, [{"name": "prune",
                                                                          "channel_prune": uniform}],
                                       seed=seed, checkpoint=checkpoint))
        rows.append({"method": "uniform L1", "seed": seed, "top1": metrics["test_top1"],
                     "macs": record["macs"], "macs_dense": record["macs_before"],
                     "params": record["params_after"]})
        print(rows[-1], flush=True)
    return rows


def _row(r: dict) -> str:
    return (f"| {r['family']} ({r['model']}, {r['image_size']}px) | {r['scope']} "
            f"| {r['macs_reduction_target']}x "
            f"| {r['params_dense']:,} -> {r['params']:,} | {r['macs_dense'] / 1e6:.2f}M -> "
            f"{r['macs'] / 1e6:.2f}M ({r['macs_reduction']:.2f}x) | {r['dense_top1']:.1f} -> "
            f"{r['top1']:.1f} | {r['speedup_b1']:.2f}x | {r['speedup_b32']:.2f}x |")


def table(rows: list[dict], pas_rows: list[dict], threads: int) -> str:
    lines = ["| family (model, input) | L1 scope | MACs target | params | MACs (measured "
             "reduction) | top-1 dense -> pruned (%) | speed-up b1 | speed-up b32 |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in rows]
    lines += ["", f"latency: CPU, {threads} thread(s), median of interleaved rounds, "
              "same process as the dense model", "",
              "| method (resnet10t, 32px, 2x fewer MACs) | top-1 per seed (%) | mean +- std "
              "| MACs |", "|---|---|---|---|"]
    for method in ("PaS", "uniform L1"):
        sel = [r for r in pas_rows if r["method"] == method]
        tops = [r["top1"] for r in sel]
        std = statistics.stdev(tops) if len(tops) > 1 else 0.0
        lines.append(f"| {method} | {', '.join(f'{t:.2f}' for t in tops)} | "
                     f"{statistics.mean(tops):.2f} +- {std:.2f} | "
                     f"{statistics.mean(r['macs'] for r in sel) / 1e6:.2f}M of "
                     f"{sel[0]['macs_dense'] / 1e6:.2f}M |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs (a few minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for latency")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_structured"))
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--update", action="store_true",
                        help="re-measure only --families (and PaS unless --skip-pas); keep the "
                        "other rows of the saved result")
    parser.add_argument("--skip-pas", action="store_true", help="with --update: keep PaS rows")
    args = parser.parse_args()
    cfg = settings(args.quick)
    torch.set_num_threads(args.threads)  # training too: a shared 2-core machine
    started = time.perf_counter()
    rows = []
    for family in args.families:
        name, kwargs, size, train = FAMILIES[family]
        model = (name, kwargs, cfg["image_size"].get(family, size), train)
        rows += speedups(family, model, cfg, args.out, args.threads)
    path = RESULTS / ("structured_quick.json" if args.quick else "structured.json")
    saved = json.loads(path.read_text()) if args.update and path.is_file() else None
    pas_rows = (saved["pas_vs_uniform_l1"] if saved and args.skip_pas
                else pas_vs_uniform(cfg, args.out))
    if saved:  # the families not re-measured keep their rows, in the saved order
        fresh = {r["family"] for r in rows}
        kept = [r for r in saved["speedups"] if r["family"] not in fresh]
        rows = sorted(kept + rows, key=lambda r: list(FAMILIES).index(r["family"]))
    text = table(rows, pas_rows, args.threads)
    print("\n" + text)
    result = {"quick": args.quick, "threads": args.threads, "settings": cfg,
              "torch": torch.__version__, "platform": platform.platform(),
              "processor": platform.processor(), "wall_s": time.perf_counter() - started,
              "speedups": rows, "pas_vs_uniform_l1": pas_rows, "table": text}
    if saved:
        result["updated_families"] = args.families
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nsaved {path} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
