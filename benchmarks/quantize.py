"""Benchmark int8 quantization and weight sharing on resnet18 and MobileNetV3 (digits).

For each model, in one process and on a fixed number of CPU threads:

1. a pipeline trains the fp32 model, quantizes it post-training (ptq) and by quantization-aware
   fine-tuning (qat); accuracies are the runner's, measured on the int8 ONNX files reloaded
   from disk by onnxruntime, sizes are the files' bytes;
2. latency at batch 1 and 64 of the deployed int8 model against the fp32 model as the pipeline
   deploys it (torch, eager) and against the same fp32 model exported to onnxruntime (same
   runtime, fp32): median of timed runs after warm-up, the variants interleaved over rounds so
   background load hits all of them alike. The deployed files drop convolution taps that only
   read padding (``compresspipe.compress.quant.conv_taps``); the fp32 onnxruntime baseline is trimmed the same
   way, and both files are also timed untrimmed, so the int8 gain and the trimming gain show
   separately;
3. QAT training step time against the fp32 step (same batch, same optimizer), with compresspipe's
   fake quantization and with torchao's fused observer + fake-quant kernels;
4. weight sharing (Deep Compression) at 8/5, 5/4 and 4/3 bits (conv/linear): accuracy of the
   weights rebuilt from the codebooks, before and after centroid fine-tuning;
5. timing only: the same latency comparison on ImageNet-sized inputs (3x224x224, batch 8,
   untrained weights calibrated on random data), to show how the int8 gain grows with the
   activations (digits at 32x32 is a small workload where per-op overheads weigh a lot).

Results: a table on stdout and benchmarks/results/quantize.json.

``--dataset fashion_mnist`` measures accuracy only, over 3 seeds (mean +- std): LeNet-5
(``compresspipe.zoo:lenet_5``) trained on Fashion-MNIST 28x28 (a fixed 20,000-image subset of
the 54,000 training images left after the 10% validation split, to fit one shared CPU thread),
then ptq and qat; the int8 accuracies are those of the deployed ONNX files reloaded from disk,
on the 10,000-image test set (the validation split is reported too). Saves
benchmarks/results/quantize_fashion_mnist.{json,md}.

Run: .venv/bin/python benchmarks/quantize.py [--quick] [--threads N] [--models resnet18 ...]
                                             [--large-size 224 (0: skip)]
     .venv/bin/python benchmarks/quantize.py --dataset fashion_mnist [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distill import mean_std  # noqa: E402

import compresspipe  # noqa: E402
from compresspipe.compress.quant.cluster import (
    CentroidHook,
    cluster_model,
    codebook_tensors,
    layer_bits,
    verify,
)
from compresspipe.compress.quant.onnx_int8 import INT8_FILE, OnnxModel, export_onnx
from compresspipe.compress.quant.pt2e import (
    calibrate,
    convert,
    enable_train_eval,
    example_batch,
    nudge_zero_bn_scales,
    prepare_ptq,
    prepare_qat,
)
from compresspipe.compress.quant.qdq import QDQScheme
from compresspipe.core.config import DataConfig, TrainConfig
from compresspipe.core.data import build_data
from compresspipe.core.measure import evaluate, median_seconds
from compresspipe.core.training import Trainer

RESULTS = Path(__file__).resolve().parent / "results" / "quantize.json"
MODELS = ("resnet18", "mobilenetv3_small_100")
# from-scratch recipes that reach a useful accuracy on digits in a few epochs
RECIPES = {
    "resnet18": {"optimizer": "sgd", "lr": 0.05, "weight_decay": 5e-4},
    "mobilenetv3_small_100": {"optimizer": "adamw", "lr": 0.003, "weight_decay": 0.05},
}
SHARING = ((8, 5), (5, 4), (4, 3))
SEED = 0
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_TRAIN_IMAGES = 20_000
STAGES = ("dense", "ptq", "qat")


def settings(quick: bool) -> dict:
    """Epochs and repeat counts of the full and the quick run."""
    if quick:
        return {"dense_epochs": 5, "qat_epochs": 1, "share_epochs": 1, "rounds": 3,
                "repeats_b1": 20, "repeats_b64": 5, "qat_steps": 5}
    return {"dense_epochs": 12, "qat_epochs": 3, "share_epochs": 2, "rounds": 5,
            "repeats_b1": 50, "repeats_b64": 10, "qat_steps": 10}


def qat_recipe(model: str) -> dict:
    """The dense recipe's optimizer and weight decay at a tenth of its learning rate."""
    recipe = dict(RECIPES.get(model, RECIPES["resnet18"]))
    recipe["lr"] = recipe["lr"] / 10
    return recipe


def pipeline(model: str, out: Path, s: dict) -> dict:
    """dense -> ptq -> qat on digits 32x32 (ptq keeps the fp32 weights: both start alike)."""
    return {
        "name": f"bench-{model}", "seed": SEED, "output_dir": str(out),
        "model": {"name": model},
        "data": {"name": "digits", "image_size": 32, "batch_size": 64, "augment": True},
        "tracking": {"enabled": False},
        "stages": [
            {"name": "dense", "train": {"epochs": s["dense_epochs"], "warmup_epochs": 1,
                                        "label_smoothing": 0.1,
                                        **RECIPES.get(model, RECIPES["resnet18"])}},
            {"name": "ptq", "ptq": {"calibration_batches": 8, "latency_repeats": 0}},
            # fine-tuning with the optimizer the model was trained with, at a tenth of its rate
            {"name": "qat", "qat": {"epochs": s["qat_epochs"], **qat_recipe(model),
                                    "freeze_bn_after": max(s["qat_epochs"] - 1, 0),
                                    "latency_repeats": 0}},
        ],
    }


def fashion_pipeline(out: Path, seed: int, s: dict) -> dict:
    """dense -> ptq -> qat of LeNet-5 on a fixed Fashion-MNIST subset (no BN: no freezing)."""
    return {
        "name": f"bench-fmnist-lenet5-s{seed}", "seed": seed, "output_dir": str(out),
        "model": {"factory": "compresspipe.zoo:lenet_5"},
        "data": {"name": "fashion_mnist", "root": str(FASHION_ROOT), "image_size": 28,
                 "batch_size": 128, "limit_train": s["train_images"]},
        "tracking": {"enabled": False},
        "stages": [
            {"name": "dense", "train": {"epochs": s["dense_epochs"], "warmup_epochs": 1,
                                        "lr": 0.05}},
            {"name": "ptq", "ptq": {"calibration_batches": 8, "latency_repeats": 0}},
            {"name": "qat", "qat": {"epochs": s["qat_epochs"], "lr": 0.005, "latency_repeats": 0}},
        ],
    }


def fashion_seeds(quick: bool, root: Path) -> dict:
    """Test and validation top-1 and bytes of every stage's deployed file, per seed."""
    s = {"dense_epochs": 2 if quick else 6, "qat_epochs": 1,
         "train_images": 2_000 if quick else FASHION_TRAIN_IMAGES}
    seeds = list(range(2 if quick else 3))
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        summary = compresspipe.run(fashion_pipeline(root / f"s{seed}", seed, s))
        metrics = {r["name"]: r["metrics"] for r in summary["stages"]}
        runs.append({k: {m: metrics[k][m] for m in ("test_top1", "deployed_val_top1", "model_bytes")}
                     for k in STAGES})
        print(f"  seed {seed}: " + ", ".join(f"{k} {runs[-1][k]['test_top1']:.2f}%" for k in STAGES)
              + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
    stats = {k: {m: mean_std([r[k][m] for r in runs])
                 for m in ("test_top1", "deployed_val_top1", "model_bytes")} for k in STAGES}
    return {"settings": s, "seeds": seeds, "runs": runs, "stats": stats}


def fashion_table(result: dict) -> str:
    """Markdown: each stage's deployed accuracy and bytes, and the int8 - fp32 verdicts."""
    st, n = result["stats"], len(result["seeds"])
    rows = [f"LeNet-5 on Fashion-MNIST 28px ({result['settings']['train_images']:,} training "
            f"images, {result['settings']['dense_epochs']} dense epochs, "
            f"{result['settings']['qat_epochs']} QAT epoch(s)); accuracy of each stage's deployed "
            f"file reloaded from disk (int8: ONNX in onnxruntime); {n} seeds, mean ± std.", "",
            "| stage | test top-1 % | val top-1 % | bytes |", "|---|---:|---:|---:|"]
    for k in STAGES:
        rows.append(f"| {k} | {st[k]['test_top1']['mean']:.2f} ± {st[k]['test_top1']['std']:.2f} | "
                    f"{st[k]['deployed_val_top1']['mean']:.2f} ± "
                    f"{st[k]['deployed_val_top1']['std']:.2f} | {st[k]['model_bytes']['mean']:,.0f} |")
    rows += ["", "**Verdict** (paired over seeds: the mean int8 − fp32 test top-1 difference "
             "against two standard errors of it):"]
    for k in ("ptq", "qat"):
        diffs = [r[k]["test_top1"] - r["dense"]["test_top1"] for r in result["runs"]]
        mean = statistics.fmean(diffs)
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else 0.0
        kind = ("gains accuracy" if mean > 2 * se else "loses accuracy" if mean < -2 * se
                else "is within noise of fp32")
        rows.append(f"- {k} int8 {kind}: {mean:+.2f} ± {se:.2f} pt, "
                    f"{st['dense']['model_bytes']['mean'] / st[k]['model_bytes']['mean']:.2f}x "
                    "smaller file.")
    rows.append(f"(qat fine-tunes {result['settings']['qat_epochs']} more epoch(s) from the dense "
                "weights, so its difference from dense includes that training, not only int8.)")
    return "\n".join(rows)


def latency(variants: dict, batch: torch.Tensor, repeats: int, rounds: int) -> dict[str, float]:
    """Median ms per variant; each round times every variant once, in turn."""
    per_round: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in variants.items():
                per_round[name].append(1e3 * median_seconds(lambda fn=fn: fn(batch), repeats))
    return {k: statistics.median(v) for k, v in per_round.items()}


def qat_step_ratio(model: torch.nn.Module, data, steps: int) -> dict[str, float]:
    """Median training step (forward, backward, SGD) of the fp32 model and its QAT graph."""
    x, y = next(iter(data.train_loader(torch.Generator().manual_seed(SEED))))
    from torchao.quantization.pt2e import FusedMovingAvgObsFakeQuantize

    from compresspipe.compress.quant import qdq

    fp32 = copy.deepcopy(model).train()
    nudge_zero_bn_scales(fp32, {})
    qat = prepare_qat(fp32, x[:2], QDQScheme(qat=True))
    # the same graph with torchao's fused observer + fake-quant kernels, for comparison
    ours, qdq.FastMovingAvgObsFakeQuantize = qdq.FastMovingAvgObsFakeQuantize, FusedMovingAvgObsFakeQuantize
    try:
        fused = prepare_qat(fp32, x[:2], QDQScheme(qat=True))
    finally:
        qdq.FastMovingAvgObsFakeQuantize = ours
    for m in (qat, fused):
        enable_train_eval(m)
        m.train()

    def step(m, opt):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    result = {}
    for name, m in (("fp32", fp32), ("qat", qat), ("qat_torchao_fused", fused)):
        opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)
        result[f"{name}_step_ms"] = 1e3 * median_seconds(lambda m=m, opt=opt: step(m, opt), steps, warmup=2)
    result["qat_over_fp32"] = result["qat_step_ms"] / result["fp32_step_ms"]
    result["qat_torchao_fused_over_fp32"] = (result["qat_torchao_fused_step_ms"]
                                             / result["fp32_step_ms"])
    return result


def weight_sharing(model: torch.nn.Module, data, epochs: int) -> list[dict]:
    """Accuracy of codebook-rebuilt weights before/after centroid fine-tuning, per bit setting."""
    rows = []
    test = data.test_loader()
    params = sum(p.numel() for p in model.parameters())
    fp32_top1 = evaluate(model, test)["top1"]
    for conv_bits, linear_bits in SHARING:
        m = copy.deepcopy(model)
        started = time.perf_counter()
        layers = cluster_model(m, layer_bits(m, conv_bits, linear_bits, {}), {})
        before = evaluate(m, test)["top1"]
        hook = CentroidHook(layers, "sum")
        cfg = TrainConfig(epochs=epochs, lr=0.0005, weight_decay=0.0, schedule="cosine")
        Trainer(m, data, cfg, device=torch.device("cpu"), seed=SEED, hooks=[hook],
                desc=f"share {conv_bits}/{linear_bits}").fit()
        hook.close()
        verify(m, layers, {})
        after = evaluate(m, test)["top1"]
        with tempfile.TemporaryDirectory() as tmp:
            from safetensors.torch import save_file

            path = Path(tmp) / "codebook.safetensors"
            save_file(codebook_tensors(m, layers), str(path))
            size = path.stat().st_size
        packed_bits = sum(layer.bits * layer.indices.numel() for layer in layers.values())
        rows.append({"bits": f"{conv_bits}/{linear_bits}", "fp32_top1": fp32_top1,
                     "top1_before_finetune": before,
                     "top1_after_finetune": after, "codebook_file_bytes": size,
                     "packed_index_bytes": (packed_bits + 7) // 8, "params": params,
                     "seconds": time.perf_counter() - started})
    return rows


def large_input_latency(name: str, size: int, threads: int, rounds: int, root: Path) -> dict:
    """fp32 vs int8 onnxruntime latency at batch 8 on 3 x size x size inputs (timing only)."""
    import timm

    torch.manual_seed(SEED)
    model = timm.create_model(name, in_chans=3, num_classes=1000).eval()
    x = torch.randn(8, 3, size, size)
    prepared = prepare_ptq(model, x[:2], QDQScheme(observer="minmax"))
    calibrate(prepared, [(torch.randn(8, 3, size, size), None)], 1)
    int8 = export_onnx(convert(prepared), x[:2], root / f"{name}-{size}.int8.onnx")
    fp32 = export_onnx(model, x[:2], root / f"{name}-{size}.fp32.onnx")
    variants = {"fp32_onnxruntime": OnnxModel(fp32, threads), "int8_onnxruntime": OnnxModel(int8, threads)}
    t = latency(variants, x, repeats=3, rounds=rounds)
    return {"input": [8, 3, size, size], **t,
            "int8_over_fp32_onnxruntime": t["int8_onnxruntime"] / t["fp32_onnxruntime"]}


def bench_model(name: str, s: dict, threads: int, root: Path) -> dict:
    out = root / name
    summary = compresspipe.run(pipeline(name, out, s))
    stages = {r["name"]: r["metrics"] for r in summary["stages"]}
    data = build_data(DataConfig(name="digits", image_size=32, batch_size=64, augment=True))
    fp32 = compresspipe.load(out / "dense").model.eval()
    example = example_batch(data.test)
    # the deployed files drop convolution taps that only read padding (compresspipe.compress.quant.conv_taps);
    # the fp32 baseline gets the same treatment, and both untrimmed files are timed too
    fp32_onnx = export_onnx(fp32, example, out / "fp32.onnx")
    fp32_full = export_onnx(fp32, example, out / "fp32.untrimmed.onnx", trim_taps=False)
    int8_full = int8_untrimmed(out / "qat" / INT8_FILE, fp32_full, out / "qat.untrimmed.onnx")
    variants = {"fp32_torch": fp32, "fp32_onnxruntime": OnnxModel(fp32_onnx, threads),
                "int8_onnxruntime": OnnxModel(out / "qat" / INT8_FILE, threads),
                "fp32_onnxruntime_untrimmed": OnnxModel(fp32_full, threads),
                "int8_onnxruntime_untrimmed": OnnxModel(int8_full, threads)}
    lat = {}
    for batch, repeats in ((1, s["repeats_b1"]), (64, s["repeats_b64"])):
        lat[f"b{batch}"] = latency(variants, example_batch(data.test, batch), repeats, s["rounds"])
    step = qat_step_ratio(fp32, data, s["qat_steps"])
    return {
        "targets": targets(lat, step),
        "accuracy": {k: stages[k]["top1"] for k in ("dense", "ptq", "qat")},
        "model_bytes": {k: stages[k]["model_bytes"] for k in ("dense", "ptq", "qat")},
        # what the trimming alone saves: the same int8 file with full kernels
        "qat_untrimmed_bytes": int8_full.stat().st_size,
        "latency_ms": lat,
        "qat_step": step,
        "weight_sharing": weight_sharing(fp32, data, s["share_epochs"]),
        "threads": threads,
    }


def int8_untrimmed(path: Path, fp32_full: Path, dest: Path) -> Path:
    """The QAT int8 file with its trimmed kernels zero-padded back to the full kernel, with the
    geometry of the untrimmed fp32 export: the graph onnxruntime runs without the trimming
    (the restored taps only ever read padding, so the outputs are the same)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from compresspipe.compress.quant.conv_taps import METADATA_KEY, recorded_windows

    proto, reference = onnx.load(str(path)), onnx.load(str(fp32_full))
    windows = recorded_windows(proto)
    geometry = {n.input[1]: {a.name: list(a.ints) for a in n.attribute if a.ints}
                for n in reference.graph.node if n.op_type == "Conv"}
    for tensor in proto.graph.initializer:
        if tensor.name in windows:
            q = numpy_helper.to_array(tensor)
            full = np.zeros((*q.shape[:2], *geometry[tensor.name]["kernel_shape"]), q.dtype)
            box = tuple(slice(a, b + 1) for a, b in windows[tensor.name])
            full[(slice(None), slice(None), *box)] = q
            tensor.CopyFrom(numpy_helper.from_array(full, tensor.name))
    producers = {o: n for n in proto.graph.node for o in n.output}
    restored = set()
    for node in proto.graph.node:
        source = producers.get(node.input[1]) if node.op_type == "Conv" else None
        if source is not None and source.input[0] in windows:
            restored.add(node.input[1])
            for attr in node.attribute:
                if attr.name in ("kernel_shape", "pads"):
                    attr.ints[:] = geometry[source.input[0]][attr.name]
    # as trim_padding_taps left it, less the record of the windows: the weights' shape
    # entries are dropped (trimming dropped them too), the rest of the file is kept
    kept = [v for v in proto.graph.value_info if v.name not in restored]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    props = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    onnx.save(proto, str(dest))
    return dest


def targets(lat: dict, step: dict) -> dict[str, bool]:
    """The issue's targets, against both fp32 baselines (torch as deployed, onnxruntime fp32)."""
    out = {"qat_step_at_most_2x_fp32": step["qat_over_fp32"] <= 2.0}
    for base in ("fp32_torch", "fp32_onnxruntime"):
        out[f"b64_int8_at_most_half_of_{base}"] = (
            lat["b64"]["int8_onnxruntime"] <= 0.5 * lat["b64"][base])
        out[f"b1_int8_not_slower_than_{base}"] = lat["b1"]["int8_onnxruntime"] <= lat["b1"][base]
    return out


def print_tables(results: dict) -> None:
    print("\nint8 (accuracy and bytes of the files reloaded from disk; top1 %)")
    print("| model | fp32 top1 | ptq int8 top1 | qat int8 top1 | fp32 bytes | int8 bytes (qat) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        a, b = r["accuracy"], r["model_bytes"]
        print(f"| {name} | {a['dense']:.2f} | {a['ptq']:.2f} | {a['qat']:.2f} | "
              f"{b['dense']:,} | {b['qat']:,} ({b['dense'] / b['qat']:.2f}x smaller) |")
    print("\nlatency, median ms (ort: onnxruntime; files with padding-only taps trimmed, and "
          "in brackets untrimmed)")
    print("| model | batch | fp32 torch | fp32 ort | int8 ort | int8/fp32 torch "
          "| int8/fp32 ort |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for batch, t in r["latency_ms"].items():
            print(f"| {name} | {batch[1:]} | {t['fp32_torch']:.3f} | {t['fp32_onnxruntime']:.3f} "
                  f"({t['fp32_onnxruntime_untrimmed']:.3f}) | {t['int8_onnxruntime']:.3f} "
                  f"({t['int8_onnxruntime_untrimmed']:.3f}) | "
                  f"{t['int8_onnxruntime'] / t['fp32_torch']:.2f}x | "
                  f"{t['int8_onnxruntime'] / t['fp32_onnxruntime']:.2f}x "
                  f"({t['int8_onnxruntime_untrimmed'] / t['fp32_onnxruntime_untrimmed']:.2f}x) |")
    large = {k: r["large_input_latency"] for k, r in results.items() if "large_input_latency" in r}
    if large:
        print("\ntiming only, batch 8 of 3x{0}x{0} (untrained weights), median ms".format(
            next(iter(large.values()))["input"][2]))
        print("| model | fp32 onnxruntime | int8 onnxruntime | int8/fp32 |")
        print("|---|---|---|---|")
        for name, t in large.items():
            print(f"| {name} | {t['fp32_onnxruntime']:.1f} | {t['int8_onnxruntime']:.1f} | "
                  f"{t['int8_over_fp32_onnxruntime']:.2f}x |")
    print("\nQAT training step (batch 64), median ms")
    print("| model | fp32 step | qat step | qat/fp32 | with torchao's fused fake-quant |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        q = r["qat_step"]
        print(f"| {name} | {q['fp32_step_ms']:.1f} | {q['qat_step_ms']:.1f} | "
              f"{q['qat_over_fp32']:.2f}x | {q['qat_torchao_fused_step_ms']:.1f} "
              f"({q['qat_torchao_fused_over_fp32']:.2f}x) |")
    print("\nweight sharing (conv/linear bits): top1 of codebook-rebuilt weights")
    print("| model | bits | fp32 | before fine-tuning | after centroid fine-tuning "
          "| codebook file bytes | packed index bytes |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for row in r["weight_sharing"]:
            print(f"| {name} | {row['bits']} | {row['fp32_top1']:.2f} | "
                  f"{row['top1_before_finetune']:.2f} | "
                  f"{row['top1_after_finetune']:.2f} | {row['codebook_file_bytes']:,} | "
                  f"{row['packed_index_bytes']:,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and timed runs")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch and onnxruntime (default 1: stable timings)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--large-size", type=int, default=224,
                        help="side of the timing-only large-input comparison (0: skip)")
    parser.add_argument("--dataset", choices=("digits", "fashion_mnist"), default="digits",
                        help="fashion_mnist: LeNet-5 fp32/ptq/qat accuracy over 3 seeds only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.dataset == "fashion_mnist":
        fashion_main(args.quick, args.threads)
        return
    s = settings(args.quick)
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            results[name] = bench_model(name, s, args.threads, Path(tmp))
            if args.large_size:
                results[name]["large_input_latency"] = large_input_latency(
                    name, args.large_size, args.threads, s["rounds"], Path(tmp))
    print_tables(results)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "quick": args.quick, "settings": s, "threads": args.threads,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__},
        "seconds": time.perf_counter() - started, "results": results,
    }, indent=2) + "\n")
    print("\ntargets met:")
    for name, r in results.items():
        print(f"  {name}: " + ", ".join(f"{k}={'yes' if v else 'NO'}"
                                          for k, v in r["targets"].items()))
    print(f"\nthreads: {args.threads}; saved {RESULTS}")


def fashion_main(quick: bool, threads: int) -> None:
    if not FASHION_ROOT.is_dir():
        sys.exit(f"error: Fashion-MNIST is not in {FASHION_ROOT}: apt-get install dataset-fashion-mnist")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = fashion_seeds(quick, Path(tmp))
    result |= {"benchmark": "quantize", "dataset": "fashion_mnist", "quick": quick,
               "model": "compresspipe.zoo:lenet_5", "threads": threads,
               "command": "python benchmarks/quantize.py --dataset fashion_mnist"
               + (" --quick" if quick else ""),
               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "shared": "2 cores shared with other jobs while measured"},
               "seconds": time.perf_counter() - started}
    table = fashion_table(result)
    print("\n" + table)
    path = RESULTS.with_name(f"quantize_fashion_mnist{'_quick' if quick else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(table + "\n")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
