"""Does knowledge distillation help? Students trained with and without KD, on digits or Fashion-MNIST.

A timm resnet18 teacher is trained once (digits at 16x16, augmented). Then, for every seed,
the same student recipe is trained twice at equal epochs and learning rate -- plain
cross-entropy, and KD (T=4, alpha=0.9, gamma=0.1, the defaults) from the frozen teacher -- with
compresspipe's one training loop and its ``DistillHook``:

  student        timm test_resnet (0.37M params, 30x smaller than the teacher), full data
  few epochs     the same student, 2 epochs
  few labels     the same student on 100 training images (10 per class)
  prune 95%      the teacher itself, 95% of its conv/fc weights removed by global magnitude
                 (torch.topk on |w|), retrained 2 epochs with MaskHook; KD teacher = its dense self
  prune 99%      the same at 99% sparsity, retrained 1 epoch (the harder regime)

Students see no augmentation (identical inputs for both arms; it also makes the logit cache
valid). Accuracy and cross-entropy are measured on the fixed 360-image digits test split;
mean +- sample std over seeds. The last table times a KD epoch with the teacher run at every
step vs. with cached teacher logits, against a plain epoch, in the same process (the arms
interleaved, one thread, CPU and wall time: the fastest of several epochs, since other
processes may share the machine).

With ``--dataset fashion_mnist`` (Fashion-MNIST at 28x28, the Debian package's idx files; 54,000
training images after the fixed 10% validation split, the 10,000-image test set) the teacher is
``compresspipe.zoo:lenet_5`` (8 epochs) and the student ``compresspipe.zoo:lenet_300_100`` (an
MLP, 0.27M params), 3 seeds, in the regimes full data (6 epochs), few epochs (1) and few labels
(100 images, 30 epochs); no pruning regimes, to keep the run near 8 min on one shared CPU
thread. The KD arms there use cached teacher logits (valid: students see no augmentation; the
loss is the same as with the teacher run at every step).

Run: .venv/bin/python benchmarks/distill.py [--quick] [--dataset digits|fashion_mnist]
Saves benchmarks/results/distill.json (digits, the default) or distill_fashion_mnist.json/.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import body_distill  # the .md table and verdict exactly as REPORT.md shows them

from compresspipe.compress.distill.config import DistillConfig
from compresspipe.compress.distill.hook import DistillHook, agreement
from compresspipe.core.config import DataConfig, TrainConfig
from compresspipe.core.data import build_data
from compresspipe.core.masks import MaskHook
from compresspipe.core.measure import check_masks, evaluate
from compresspipe.core.models import build_from_spec
from compresspipe.core.training import Trainer
from compresspipe.zoo import lenet_5, lenet_300_100

RESULTS = Path(__file__).resolve().parent / "results" / "distill.json"
CPU = torch.device("cpu")
IMAGE_SIZE = 16
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
KD = DistillConfig(teacher="resnet18", temperature=4.0, alpha=0.9, gamma=0.1)


def timm_model(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_from_spec({"source": "timm", "name": name,
                            "kwargs": {"in_chans": 1, "num_classes": 10}})


def fit(model: nn.Module, data, cfg: TrainConfig, seed: int, hooks=()) -> list[dict]:
    """The pipeline's training loop, with its per-epoch printing kept out of the table."""
    with contextlib.redirect_stdout(io.StringIO()):
        return Trainer(model, data, cfg, device=CPU, seed=seed, hooks=list(hooks)).fit()


def zoo_model(factory, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return factory(in_chans=1, num_classes=10, image_size=28)


def kd_hook(teacher: nn.Module, student: nn.Module, cache: bool = False,
            image_size: int = IMAGE_SIZE) -> DistillHook:
    cfg = KD.model_copy(update={"cache_teacher_logits": cache})
    return DistillHook(teacher, cfg, student, (1, image_size, image_size))


def magnitude_masks(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Global magnitude pruning of every conv/linear weight: keep the largest |w| overall."""
    weights = {n: p.detach() for n, p in model.named_parameters() if p.dim() > 1}
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, int(round((1 - sparsity) * flat.numel()))).indices] = True
    masks, offset = {}, 0
    for name, w in weights.items():
        masks[name] = keep[offset: offset + w.numel()].view_as(w).clone()
        offset += w.numel()
    return masks


def measure(model: nn.Module, teacher: nn.Module, data) -> dict[str, float]:
    m = evaluate(model, data.test_loader(), CPU)
    return {"top1": m["top1"], "loss": m["loss"],
            "agreement": agreement(model, teacher, data.test_loader(), CPU)}


def train_teacher(teacher, train, test, epochs: int, label: str) -> dict[str, float]:
    """Train the teacher once (seed 1234), freeze it for eval, report its test accuracy."""
    started = time.perf_counter()
    fit(teacher, train, TrainConfig(epochs=epochs, lr=0.05, warmup_epochs=1), 1234)
    teacher.eval()
    metrics = evaluate(teacher, test.test_loader(), CPU)
    print(f"teacher {label}: top1 {metrics['top1']:.2f}%, loss {metrics['loss']:.4f} "
          f"({time.perf_counter() - started:.0f}s)", flush=True)
    return metrics


def student_arm(teacher, data, seed: int, epochs: int, kd: bool) -> dict[str, float]:
    student = timm_model("test_resnet", seed)
    hooks = [kd_hook(teacher, student)] if kd else []
    fit(student, data, TrainConfig(epochs=epochs, lr=0.05), seed, hooks)
    return measure(student, teacher, data)


def prune_arm(teacher, data, seed: int, sparsity: float, epochs: int, kd: bool) -> dict[str, float]:
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    masks = magnitude_masks(student, sparsity)
    hooks = [MaskHook(masks)]
    if kd:
        hooks.insert(0, kd_hook(teacher, student))
    fit(student, data, TrainConfig(epochs=epochs, lr=0.01), seed, hooks)
    check_masks(student, masks, f"prune {sparsity:.0%}")
    return measure(student, teacher, data)


def epoch_times(teacher, data, epochs: int, make_student=None,
                image_size: int = IMAGE_SIZE) -> dict[str, dict[str, float]]:
    """Seconds per training epoch (with its test evaluation) for each arm: the fastest wall
    time and the fastest CPU time of epochs 2..E (after warm-up, once the cache is full).

    The arms run interleaved, epoch by epoch, on one thread: CPU time then counts the work
    this process did, which other processes sharing the machine barely disturb."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    wall: dict[str, list[float]] = {"plain": [], "kd": [], "kd_cached": []}
    cpu: dict[str, list[float]] = {arm: [] for arm in wall}
    cfg = TrainConfig(epochs=1, lr=0.05)
    make_student = make_student or (lambda: timm_model("test_resnet", 0))
    students = {a: make_student() for a in wall}
    hooks = {"plain": [], "kd": [kd_hook(teacher, students["kd"], image_size=image_size)],
             "kd_cached": [kd_hook(teacher, students["kd_cached"], cache=True,
                                   image_size=image_size)]}
    try:
        for epoch in range(epochs):
            for arm in wall:
                started, started_cpu = time.perf_counter(), time.process_time()
                fit(students[arm], data, cfg, epoch, hooks[arm])
                if epoch > 0:
                    wall[arm].append(time.perf_counter() - started)
                    cpu[arm].append(time.process_time() - started_cpu)
    finally:
        torch.set_num_threads(threads)
    return {arm: {"wall": min(wall[arm]), "cpu": min(cpu[arm])} for arm in wall}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def seeded_rows(regimes: dict, seeds: list[int]) -> dict:
    """Every regime's CE and KD arms over the seeds, with mean and std of each metric."""
    rows = {}
    for name, arm in regimes.items():
        t0 = time.perf_counter()
        runs = {kd: [arm(seed, kd) for seed in seeds] for kd in (False, True)}
        rows[name] = {("kd" if kd else "ce"): {"runs": r, **{k: mean_std([x[k] for x in r])
                                                            for k in ("top1", "loss", "agreement")}}
                      for kd, r in runs.items()}
        print(f"  {name}: CE {rows[name]['ce']['top1']['mean']:.2f}, KD "
              f"{rows[name]['kd']['top1']['mean']:.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return rows


def fashion_student_arm(teacher, data, seed: int, epochs: int, kd: bool) -> dict[str, float]:
    student = zoo_model(lenet_300_100, seed)
    hooks = [kd_hook(teacher, student, cache=True, image_size=28)] if kd else []
    fit(student, data, TrainConfig(epochs=epochs, lr=0.05), seed, hooks)
    return measure(student, teacher, data)


def run_fashion(quick: bool) -> dict:
    """KD vs CE for an MLP student of a LeNet-5 teacher on Fashion-MNIST (see the docstring)."""
    seeds = list(range(2 if quick else 3))
    e = {"teacher": 3 if quick else 8, "student": 3 if quick else 6, "few": 1,
         "few_labels": 15 if quick else 30, "timing": 3}
    base = {"name": "fashion_mnist", "root": str(FASHION_ROOT), "image_size": 28,
            "batch_size": 128}
    full = build_data(DataConfig(**base))
    few = build_data(DataConfig(**base, limit_train=100))
    started = time.perf_counter()
    teacher = zoo_model(lenet_5, 1234)
    teacher_metrics = train_teacher(teacher, full, full, e["teacher"], "lenet_5")
    regimes = {
        f"student, {e['student']} epochs":
            lambda s, kd: fashion_student_arm(teacher, full, s, e["student"], kd),
        f"student, {e['few']} epoch": lambda s, kd: fashion_student_arm(teacher, full, s, e["few"], kd),
        f"student, 100 images, {e['few_labels']} epochs":
            lambda s, kd: fashion_student_arm(teacher, few, s, e["few_labels"], kd),
    }
    rows = seeded_rows(regimes, seeds)
    timing = epoch_times(teacher, full, e["timing"], lambda: zoo_model(lenet_300_100, 0), 28)
    return {
        "benchmark": "distill", "dataset": "fashion_mnist", "quick": quick, "seeds": seeds,
        "epochs": e, "image_size": 28, "train_images": len(full.train), "test_images": len(full.test),
        "kd": KD.model_dump(mode="json") | {"teacher": "compresspipe.zoo:lenet_5",
                                            "cache_teacher_logits": True},
        "student": "compresspipe.zoo:lenet_300_100",
        "teacher": {"model": "compresspipe.zoo:lenet_5", **teacher_metrics},
        "regimes": rows, "epoch_time_s": timing,
        "command": "python benchmarks/distill.py --dataset fashion_mnist" + (" --quick" if quick else ""),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                    "shared": "2 cores shared with other jobs while measured"},
        "wall_time_s": time.perf_counter() - started,
    }


def run(quick: bool) -> dict:
    seeds = list(range(2 if quick else 5))
    e = {"teacher": 4 if quick else 10, "student": 3 if quick else 6, "few": 2,
         "few_labels": 15 if quick else 30, "prune": 1 if quick else 2, "prune_hard": 1,
         "timing": 4 if quick else 8}
    full = build_data(DataConfig(name="digits", image_size=IMAGE_SIZE, batch_size=64))
    augmented = build_data(DataConfig(name="digits", image_size=IMAGE_SIZE, batch_size=64,
                                      augment=True))
    few = build_data(DataConfig(name="digits", image_size=IMAGE_SIZE, batch_size=64,
                                limit_train=100))
    started = time.perf_counter()
    teacher = timm_model("resnet18", 1234)
    teacher_metrics = train_teacher(teacher, augmented, full, e["teacher"], "resnet18")

    regimes = {
        f"student, {e['student']} epochs": lambda s, kd: student_arm(teacher, full, s, e["student"], kd),
        f"student, {e['few']} epochs": lambda s, kd: student_arm(teacher, full, s, e["few"], kd),
        f"student, 100 images, {e['few_labels']} epochs":
            lambda s, kd: student_arm(teacher, few, s, e["few_labels"], kd),
        f"prune 95%, {e['prune']} epochs": lambda s, kd: prune_arm(teacher, full, s, 0.95, e["prune"], kd),
        f"prune 99%, {e['prune_hard']} epoch": lambda s, kd: prune_arm(teacher, full, s, 0.99,
                                                                        e["prune_hard"], kd),
    }
    rows = seeded_rows(regimes, seeds)
    for name in rows:
        if name.startswith("prune"):
            sparsity = int(name.split("%")[0].removeprefix("prune ")) / 100
            pruned = copy.deepcopy(teacher)
            with torch.no_grad():
                for n, m in magnitude_masks(pruned, sparsity).items():
                    pruned.get_parameter(n).mul_(m)
            rows[name]["before_retraining"] = evaluate(pruned, full.test_loader(), CPU)
    timing = epoch_times(teacher, full, e["timing"])
    return {
        "benchmark": "distill", "quick": quick, "seeds": seeds, "epochs": e,
        "image_size": IMAGE_SIZE, "kd": KD.model_dump(mode="json"),
        "teacher": {"model": "resnet18", **teacher_metrics},
        "regimes": rows, "epoch_time_s": timing,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
        "wall_time_s": time.perf_counter() - started,
    }


def print_report(result: dict) -> None:
    n = len(result["seeds"])
    print(f"\nKD (T={result['kd']['temperature']:g}, alpha={result['kd']['alpha']:g}, "
          f"gamma={result['kd']['gamma']:g}) vs plain CE; {result.get('dataset', 'digits')} "
          f"{result['image_size']}x{result['image_size']}, {n} seeds, mean +- std; teacher "
          f"{result['teacher']['model']} top1 "
          f"{result['teacher']['top1']:.2f}%")
    print("| regime | CE top1 % | KD top1 % | diff | CE loss | KD loss | "
          "agreement CE / KD % |")
    print("|---|---|---|---|---|---|---|")
    for name, row in result["regimes"].items():
        ce, kd = row["ce"], row["kd"]
        print(f"| {name} | {ce['top1']['mean']:.2f} +- {ce['top1']['std']:.2f} | "
              f"{kd['top1']['mean']:.2f} +- {kd['top1']['std']:.2f} | "
              f"{kd['top1']['mean'] - ce['top1']['mean']:+.2f} | "
              f"{ce['loss']['mean']:.3f} +- {ce['loss']['std']:.3f} | "
              f"{kd['loss']['mean']:.3f} +- {kd['loss']['std']:.3f} | "
              f"{ce['agreement']['mean']:.1f} / {kd['agreement']['mean']:.1f} |")
    for name, row in result["regimes"].items():
        if "before_retraining" in row:
            print(f"  {name.split(',')[0]} before retraining: top1 "
                  f"{row['before_retraining']['top1']:.2f}%")
    t = result["epoch_time_s"]
    print(f"\n| epoch of the {result.get('student', 'test_resnet')} student, 1 thread | CPU s | "
          "vs plain | wall s | vs plain |")
    print("|---|---|---|---|---|")
    for arm, label in (("plain", "plain CE"), ("kd", "KD, teacher every step"),
                       ("kd_cached", "KD, cached teacher logits")):
        print(f"| {label} | {t[arm]['cpu']:.3f} | {t[arm]['cpu'] / t['plain']['cpu']:.2f}x | "
              f"{t[arm]['wall']:.3f} | {t[arm]['wall'] / t['plain']['wall']:.2f}x |")
    print(f"\ntotal {result['wall_time_s']:.0f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, fewer epochs, a weaker teacher")
    parser.add_argument("--dataset", choices=("digits", "fashion_mnist"), default="digits",
                        help="digits (default: resnet18 -> test_resnet) or fashion_mnist "
                        "(lenet_5 -> lenet_300_100)")
    args = parser.parse_args()
    if args.dataset == "fashion_mnist" and not FASHION_ROOT.is_dir():
        sys.exit(f"error: Fashion-MNIST is not in {FASHION_ROOT}: apt-get install dataset-fashion-mnist")
    if args.dataset == "fashion_mnist":
        torch.set_num_threads(1)  # the machine is shared: one thread, and honest CPU times
        result = run_fashion(args.quick)
    else:
        result = run(args.quick)
    print_report(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    stem = "distill" + ("_fashion_mnist" if args.dataset == "fashion_mnist" else "")
    path = RESULTS.with_name(f"{stem}{'_quick' if args.quick else ''}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    if args.dataset == "fashion_mnist":
        path.with_suffix(".md").write_text(body_distill(result) + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
