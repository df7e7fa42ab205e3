"""Training-step time with masks enforced (in place after each step, as compresspipe does) vs
dense vs torch.nn.utils.prune (a forward pre-hook that multiplies by the mask), measured in one
run, interleaved, median of many steps.

    .venv/bin/python benchmarks/mask_overhead.py [--steps 60] [--model resnet18]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as torch_prune

from compresspipe.compress.pruning.scopes import Targets, compute_masks, prunable_weights
from compresspipe.core.masks import MaskHook

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def make():
        torch.manual_seed(0)
        return timm.create_model(args.model, in_chans=1, num_classes=10)

    x, y = torch.randn(args.batch, 1, 32, 32), torch.randint(0, 10, (args.batch,))
    variants = {"dense": make(), "compresspipe masks": make(), "torch.nn.utils.prune": make()}
    names = prunable_weights(variants["dense"])
    masks = compute_masks({n: p.detach().abs() for n, p in variants["dense"].named_parameters()
                           if n in names}, Targets(names), 0.9, "global")
    hook = MaskHook(masks)

    class _T:  # what MaskHook.on_train_start reads
        model = variants["compresspipe masks"]

    hook.on_train_start(_T)
    modules = dict(variants["torch.nn.utils.prune"].named_modules())
    for n in names:
        torch_prune.custom_from_mask(modules[n.rsplit(".", 1)[0]], "weight", masks[n])
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for step in range(args.steps + 5):
        for key, model in variants.items():  # interleaved: interference hits all alike
            started = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opts[key].zero_grad(set_to_none=True)
            loss.backward()
            opts[key].step()
            if key == "compresspipe masks":
                hook.after_step(model, step)
            if step >= 5:
                times[key].append(time.perf_counter() - started)
    dense = statistics.median(times["dense"])
    rows = {k: {"median_ms": 1000 * statistics.median(v),
                "ratio_vs_dense": statistics.median(v) / dense} for k, v in times.items()}
    print(f"{args.model}, batch {args.batch}, 32x32, {args.threads} thread(s), "
          f"{args.steps} steps each, 90% sparsity")
    print("| variant | median step ms | vs dense |\n|---|---:|---:|")
    for k, r in rows.items():
        print(f"| {k} | {r['median_ms']:.1f} | {r['ratio_vs_dense']:.3f}x |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mask_overhead.json").write_text(json.dumps(
        {"model": args.model, "batch": args.batch, "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
