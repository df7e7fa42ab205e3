"""Structured-pruning speed-ups at deployment size: 224 px, batch 1 and 32, torch and onnxruntime.

For ResNet, MobileNetV3, EfficientNet, ConvNeXt and ViT at their ImageNet shapes (random weights:
latency does not depend on the values), remove channels with the real ``channel_prune``
algorithm (L1 filter norm, global ranking, MACs counted at 224 px) to 2x and 4x fewer MACs, then
time the dense and the pruned networks in fp32 on the CPU: torch eager and onnxruntime (the file
compresspipe's export writes). Rounds are interleaved (dense, 2x, 4x, dense, ...; torch and
onnxruntime alike) and the median round is reported: the machine is shared with other jobs.
Each runtime uses ``--threads`` intra-op threads (default 1).

Target (issue 17), at 2x fewer MACs and 224 px: >= 1.5x at batch 32 and >= 1.3x at batch 1.
Where a family misses, the torch and onnxruntime profilers' per-operator times of the dense and the 2x network at
batch 1 say where the time goes.

``--latency-budget 0.77`` prunes with ``target: {latency: 0.77}`` (1/1.3: the batch-1 target)
instead, where MACs mislead. ``--round-to N`` keeps widths at multiples of N (channel_prune's
default, 8; results of other values are saved as ``structured_deploy_round<N>*``). With
round_to 1, onnxruntime leaves its blocked (NCHWc) convolutions on odd widths: MobileNetV3 and
EfficientNet then ran slower pruned than dense (structured_deploy_round1_quick.md; the
onnxruntime profile of ConvNeXt in structured_deploy_round1_convnext_quick.json shows Conv time
up and ReorderInput gone).

Run: .venv/bin/python benchmarks/structured_deploy.py [--quick] [--families ResNet ViT]
Results: benchmarks/results/structured_deploy[_quick].json and .md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from compresspipe.compress.quant.onnx_int8 import export_onnx  # noqa: E402
from compresspipe.compress.structured.allocate import allocate, remove_units  # noqa: E402
from compresspipe.compress.structured.cost import CostModel  # noqa: E402
from compresspipe.compress.structured.graph import StructuredGraph  # noqa: E402
from compresspipe.compress.structured.importance import make_importance, unit_scores  # noqa: E402
from compresspipe.compress.structured.latency_budget import (  # noqa: E402
    latency_ratio,
    search_latency,
)
from compresspipe.compress.structured.latency_budget import (
    pruned_copy as narrowed_copy,
)
from compresspipe.core.measure import count_macs  # noqa: E402
from compresspipe.core.models import build_from_spec  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = {
    "ResNet": "resnet18",
    "MobileNetV3": "mobilenetv3_large_100",
    "EfficientNet": "efficientnet_b0",
    "ConvNeXt": "convnext_nano",
    "ViT": "vit_tiny_patch16_224",
}
RATIOS = {2: 0.5, 4: 0.75}
TARGET = {1: 1.3, 32: 1.5}


def pruned_copy(name: str, size: int, ratio: float | None, round_to: int = 8
                ) -> torch.nn.Module:
    """The ImageNet-shaped network, with channels removed to (1 - ratio) of its MACs."""
    torch.manual_seed(0)
    model = build_from_spec({"source": "timm", "name": name, "kwargs": {}}).eval()
    if ratio is None:
        return model
    graph = StructuredGraph(model, (1, 3, size, size))
    cost = CostModel(graph)
    goal = float(cost.evaluate()["macs"]) * (1 - ratio)
    allocation = allocate(graph, cost, unit_scores(graph, make_importance("l1")), "macs", goal,
                          round_to=round_to)
    remove_units(graph, allocation.removals)
    return model.eval()


def _time(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(models: dict, size: int, batch: int, rounds: int, repeats: int, threads: int,
            tmp: Path) -> dict[str, dict[str, float]]:
    """Median-of-rounds seconds per forward pass, {runtime: {variant: s}}, interleaved."""
    x = torch.randn(batch, 3, size, size)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sessions = {}
    for key, model in models.items():
        # a batch of 2 to trace: with 1, torch.export specialises the batch dimension to 1 and
        # the dynamic batch fails ("Invalid ranges [2:1]", ConvNeXt)
        path = export_onnx(model, torch.randn(2, *x.shape[1:]), tmp / f"{key}.onnx",
                           trim_taps=False)
        sessions[key] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = x.numpy().astype(np.float32)
    samples = {rt: {k: [] for k in models} for rt in ("torch", "onnxruntime")}
    torch.set_num_threads(threads)
    with torch.inference_mode():
        for key, model in models.items():  # warm-up
            model(x)
            sessions[key].run(None, {sessions[key].get_inputs()[0].name: feed})
        for _ in range(rounds):
            for key, model in models.items():
                samples["torch"][key].append(_time(lambda m=model: m(x), repeats))
                s = sessions[key]
                name = s.get_inputs()[0].name
                samples["onnxruntime"][key].append(
                    _time(lambda s=s, n=name: s.run(None, {n: feed}), repeats))
    return {rt: {k: statistics.median(v) for k, v in d.items()} for rt, d in samples.items()}


def ort_top_ops(path: Path, feed: np.ndarray, threads: int, n: int = 5) -> dict[str, float]:
    """Milliseconds per run of the costliest onnxruntime operator types (its profiler, after
    graph optimisation: fused and layout-transformed nodes count under their own names)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    runs = 5
    for _ in range(runs + 1):
        session.run(None, {name: feed})
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + e["dur"] / 1000 / (runs + 1)
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:n]}


def top_ops(model: torch.nn.Module, size: int, threads: int, n: int = 4) -> dict[str, float]:
    """Self CPU milliseconds of the costliest operators at batch 1 (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile  # lazy: only for missed targets

    torch.set_num_threads(threads)
    x = torch.randn(1, 3, size, size)
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                model(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {e.key: round(e.self_cpu_time_total / 3000, 2) for e in events[:n]}


def timed(models: dict, size: int, cfg: dict, threads: int, tmp: Path):
    """(batch, runtime, seconds per model) at batch 1 and 32, the models interleaved."""
    for batch in (1, 32):
        times = measure(models, size, batch, cfg["rounds"], cfg["repeats"][batch], threads, tmp)
        for runtime, t in times.items():
            yield batch, runtime, t


def family_rows(family: str, name: str, size: int, cfg: dict, threads: int) -> list[dict]:
    models = {"dense": pruned_copy(name, size, None)}
    for factor, ratio in RATIOS.items():
        models[f"{factor}x"] = pruned_copy(name, size, ratio, cfg["round_to"])
    macs = {k: count_macs(m, (1, 3, size, size))["macs"] for k, m in models.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch, runtime, t in timed(models, size, cfg, threads, Path(tmp)):
            for factor in RATIOS:
                key = f"{factor}x"
                rows.append({"family": family, "model": name, "image_size": size,
                             "round_to": cfg["round_to"],
                             "batch": batch, "runtime": runtime, "macs_target": factor,
                             "macs_reduction": macs["dense"] / macs[key],
                             "dense_ms": 1000 * t["dense"], "pruned_ms": 1000 * t[key],
                             "speedup": t["dense"] / t[key]})
                print(_line(rows[-1]), flush=True)
        two = [r for r in rows if r["macs_target"] == 2]
        if any(r["speedup"] < TARGET[r["batch"]] for r in two):  # where does the time go?
            feed = torch.randn(1, 3, size, size).numpy()
            profiles = {"torch": {k: top_ops(models[k], size, threads) for k in ("dense", "2x")},
                        "onnxruntime": {k: ort_top_ops(Path(tmp) / f"{k}.onnx", feed, threads)
                                        for k in ("dense", "2x")}}
            for r in two:
                r["profile_b1_ms"] = profiles[r["runtime"]]
            print(json.dumps({family: profiles}, indent=1), flush=True)
    return rows


def budget_rows(family: str, name: str, size: int, budget: float, cfg: dict, threads: int
                ) -> list[dict]:
    """channel_prune's ``target: {latency: budget}`` (torch, batch 1, this machine), then the
    network it chose timed like the MACs rows: both runtimes, batch 1 and 32."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = pruned_copy(name, size, None)
    dense = copy.deepcopy(model)
    graph = StructuredGraph(model, (1, 3, size, size))
    cost = CostModel(graph)
    scores = unit_scores(graph, make_importance("l1"))
    macs = float(cost.evaluate()["macs"])
    search = search_latency(
        lambda f: allocate(graph, cost, scores, "macs", macs * (1 - f), round_to=cfg["round_to"]),
        lambda a: latency_ratio(dense, narrowed_copy(graph, a.removals), graph.input_shape, [1],
                                cfg["repeats"][1], cfg["rounds"], threads),
        budget, cfg["search_steps"])
    remove_units(graph, search.allocation.removals)
    models = {"dense": dense, "budget": model.eval()}
    reduction = count_macs(dense, (1, 3, size, size))["macs"] / count_macs(
        model, (1, 3, size, size))["macs"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch, runtime, t in timed(models, size, cfg, threads, Path(tmp)):
            rows.append({"family": family, "model": name, "image_size": size,
                         "round_to": cfg["round_to"], "batch": batch, "runtime": runtime,
                         "latency_budget": budget, "search": search.record(),
                         "macs_reduction": reduction, "dense_ms": 1000 * t["dense"],
                         "pruned_ms": 1000 * t["budget"],
                         "speedup": t["dense"] / t["budget"]})
            print(f"{family:<12} b{batch:<3} {runtime:<11} latency budget {budget:g} "
                  f"(MACs /{reduction:.2f}) = {rows[-1]['speedup']:.2f}x", flush=True)
    return rows


def budget_table(rows: list[dict], threads: int, size: int) -> str:
    lines = ["| family (model) | latency budget (torch b1) | MACs reduction it needed | "
             "torch b1 | torch b32 | onnxruntime b1 | onnxruntime b32 |",
             "|---|---|---|---|---|---|---|"]
    for family in dict.fromkeys(r["family"] for r in rows):
        sel = {(r["runtime"], r["batch"]): r for r in rows if r["family"] == family}
        r0 = next(iter(sel.values()))
        cells = [f"{sel[(rt, b)]['speedup']:.2f}x" for rt in ("torch", "onnxruntime")
                 for b in (1, 32)]
        lines.append(f"| {family} ({r0['model']}) | {r0['latency_budget']:g} | "
                     f"{r0['macs_reduction']:.2f}x | " + " | ".join(cells) + " |")
    lines += ["", f"{size} px, fp32, CPU, {threads} intra-op thread(s); channel_prune's "
              "latency target searched over the MACs removed (bisection, torch batch 1 timed "
              "against the dense network), then timed again interleaved; machine shared with "
              "other jobs."]
    return "\n".join(lines)


def _line(r: dict) -> str:
    return (f"{r['family']:<12} b{r['batch']:<3} {r['runtime']:<11} {r['macs_target']}x "
            f"(MACs /{r['macs_reduction']:.2f}) {r['dense_ms']:8.2f} -> {r['pruned_ms']:8.2f} ms "
            f"= {r['speedup']:.2f}x")


def table(rows: list[dict], threads: int, size: int) -> str:
    lines = ["| family (model) | MACs target (measured) | torch b1 | torch b32 | onnxruntime b1 "
             "| onnxruntime b32 | target at 2x (b1 >= 1.3, b32 >= 1.5) |",
             "|---|---|---|---|---|---|---|"]
    for family in dict.fromkeys(r["family"] for r in rows):
        for factor in RATIOS:
            sel = {(r["runtime"], r["batch"]): r for r in rows
                   if r["family"] == family and r["macs_target"] == factor}
            any_row = next(iter(sel.values()))
            cells = [f"{sel[(rt, b)]['speedup']:.2f}x" for rt in ("torch", "onnxruntime")
                     for b in (1, 32)]
            verdict = ""
            if factor == 2:
                missed = [f"{rt} b{b}" for (rt, b), r in sel.items() if r["speedup"] < TARGET[b]]
                verdict = "met" if not missed else "missed: " + ", ".join(sorted(missed))
            lines.append(f"| {family} ({any_row['model']}) | {factor}x "
                         f"({any_row['macs_reduction']:.2f}x) | " + " | ".join(cells)
                         + f" | {verdict} |")
    lines += ["", f"{size} px, fp32, CPU, {threads} intra-op thread(s) per runtime; median of "
              "interleaved rounds (dense, 2x, 4x; torch and onnxruntime alike) on a machine "
              "shared with other jobs; random weights; channels removed by channel_prune's "
              "algorithm (L1, global)."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--tag", default="", help="suffix of the result file name (a part run)")
    parser.add_argument("--round-to", type=int, default=8,
                        help="channel_prune's round_to (its default, 8): kept widths at "
                        "multiples of this")
    parser.add_argument("--latency-budget", type=float, default=None,
                        help="instead of 2x/4x fewer MACs: channel_prune's target {latency: F}")
    args = parser.parse_args()
    cfg = ({"rounds": 3, "repeats": {1: 5, 32: 1}} if args.quick
           else {"rounds": 5, "repeats": {1: 10, 32: 2}})
    cfg["round_to"], cfg["search_steps"] = args.round_to, 4
    started = time.perf_counter()
    rows = []
    loads = [os.getloadavg()[0]]  # the machine is shared: the load says how much
    name = "structured_deploy" + (f"_round{args.round_to}" if args.round_to != 8 else "")
    name += f"_latency{args.latency_budget:g}" if args.latency_budget else ""
    name += (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else "")
    for i, family in enumerate(args.families):
        if args.latency_budget:
            rows += budget_rows(family, FAMILIES[family], args.size, args.latency_budget, cfg,
                                args.threads)
            text = budget_table(rows, args.threads, args.size)
        else:
            rows += family_rows(family, FAMILIES[family], args.size, cfg, args.threads)
            text = table(rows, args.threads, args.size)
        loads.append(os.getloadavg()[0])
        text += (f" 1-minute load average {min(loads):.1f}–{max(loads):.1f} on "
                 f"{os.cpu_count()} cores (sampled between families).")
        result = {"quick": args.quick, "threads": args.threads, "image_size": args.size,
                  "settings": cfg, "torch": torch.__version__, "onnxruntime": ort.__version__,
                  "platform": platform.platform(), "processor": platform.processor(),
                  "complete": i == len(args.families) - 1,
                  "wall_s": time.perf_counter() - started, "load_1min": loads, "rows": rows,
                  "table": text}
        RESULTS.mkdir(parents=True, exist_ok=True)  # saved after every family: runs are long
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (RESULTS / f"{name}.md").write_text(text + "\n")
    print("\n" + text)
    print(f"\nsaved {RESULTS / name}.json ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
