"""Per-layer sensitivity scans: the validation top-1 and loss of the model when only one layer is
changed — pruned one-shot by magnitude to a sparsity, weight-shared at a number of bits, or
int8-quantized (weights and input) — with no retraining. The scan decides (allocation of a
global target, bits under a budget, which layers stay float), so it reads the validation split
and never the test set.

The record (JSON, kept in the artifact by ``artifact_keys.set_sensitivity``)::

    {"version": 1, "split": "val", "images": 512, "dense": {"top1": .., "loss": ..},
     "layers": {"layer1.0.conv1.weight": {"family": "conv", "shape": [..], "params": ..,
                "sparsity": [{"sparsity": 0.5, "top1": .., "loss": ..}, ...],
                "bits": [{"bits": 4, "top1": .., "loss": ..}, ...],
                "int8": {"top1": .., "loss": ..}}}}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core.data import DataBundle
from ..core.measure import evaluate
from .quant.cluster import cluster_weight

Batches = list[tuple[torch.Tensor, torch.Tensor]]
INT8_WEIGHT_MAX = 127  # symmetric int8 weights in [-127, 127], as the QDQ quantizer writes them


# -- the validation batches ----------------------------------------------------------------------


def validation_batches(data: DataBundle, max_batches: int, device: torch.device | str = "cpu"
                       ) -> tuple[Batches, str]:
    """Up to ``max_batches`` batches of the validation split, in memory on ``device`` (every
    scan point sees the same images), and the split's name."""
    loader, split = _validation_loader(data)
    batches = []
    for i, (x, y) in enumerate(loader):
        if i >= max_batches:
            break
        batches.append((x.to(device), y.to(device)))
    return batches, split


def _validation_loader(data: DataBundle) -> tuple[DataLoader, str]:
    """The validation split (``val_loader`` refuses, naming this step, without one)."""
    return data.val_loader(purpose="a sensitivity scan"), "val"


# -- which layers -----------------------------------------------------------------------------------


def layer_family(module: nn.Module) -> str:
    """conv, depthwise, pointwise, grouped or linear: layers of one family share a plot."""
    if isinstance(module, nn.Linear):
        return "linear"
    groups, k = module.groups, math.prod(module.kernel_size)
    if groups > 1 and groups == module.in_channels:
        return "depthwise"
    if groups > 1:
        return "grouped"
    return "pointwise" if k == 1 else "conv"


def modules_of(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """{weight name: its module} for weight names such as 'layer1.0.conv1.weight'."""
    modules = dict(model.named_modules())
    return {n: modules[n.removesuffix(".weight")] for n in names}


# -- the scans --------------------------------------------------------------------------------------


@torch.no_grad()
def scan(model: nn.Module, names: Sequence[str], batches: Batches, *, split: str,
         sparsities: Sequence[float] = (), bits: Sequence[int] = (), int8: bool = False,
         masks: dict[str, torch.Tensor] | None = None, kmeans_iters: int = 30,
         device: torch.device | str = "cpu") -> dict[str, Any]:
    """Measure every layer of ``names`` alone at every sparsity and bits value (and int8);
    the model comes back with exactly its weights."""
    model = model.to(device).eval()
    masks = masks or {}
    params = dict(model.named_parameters())
    modules = modules_of(model, names)
    dense = _measure(model, batches, device)
    ranges = input_ranges(model, modules, batches) if int8 else {}
    layers: dict[str, Any] = {}
    for name in names:
        w = params[name]
        original = w.detach().clone()
        row: dict[str, Any] = {"family": layer_family(modules[name]), "shape": list(w.shape),
                               "params": w.numel(), "sparsity": [], "bits": []}
        ranking = magnitude_ranking(original, masks.get(name))
        for s in sparsities:
            kept = magnitude_keep(ranking, original, s)
            w.copy_(original * kept)
            row["sparsity"].append({"sparsity": 1 - int(kept.sum()) / w.numel(),
                                    **_measure(model, batches, device)})
        for b in bits:
            shared = cluster_weight(name, original, b, masks.get(name), kmeans_iters).weight()
            w.copy_(shared.to(w.device, w.dtype))
            row["bits"].append({"bits": b, **_measure(model, batches, device)})
        w.copy_(original)
        if int8:
            row["int8"] = _int8_alone(model, modules[name], w, ranges[name], batches, device)
        layers[name] = row
    return {"version": 1, "split": split, "images": sum(len(y) for _, y in batches),
            "dense": dense, "layers": layers}


def magnitude_ranking(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Flat positions of the weights that are still there, largest |w| first (sorted once per
    layer, for every sparsity of the grid)."""
    score = weight.detach().abs().flatten().float()
    order = torch.argsort(score, descending=True, stable=True)
    if mask is not None:
        order = order[mask.flatten().to(order.device).bool()[order]]
    return order


def magnitude_keep(ranking: torch.Tensor, weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One-shot magnitude mask of one layer: its n − round(s·n) largest surviving weights."""
    keep = min(weight.numel() - int(round(sparsity * weight.numel())), ranking.numel())
    out = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    out[ranking[:keep]] = True
    return out.view_as(weight)


def _measure(model: nn.Module, batches: Batches, device) -> dict[str, float]:
    m = evaluate(model, batches, device)
    return {"top1": m["top1"], "loss": m["loss"]}


# -- int8, one layer at a time (the QDQ scheme, simulated in fp32) ----------------------------------


def input_ranges(model: nn.Module, modules: dict[str, nn.Module], batches: Batches
                 ) -> dict[str, tuple[float, float]]:
    """(min, max) of every module's input over the batches: the min-max calibration."""
    ranges: dict[str, list[float]] = {n: [math.inf, -math.inf] for n in modules}
    handles = []
    for name, module in modules.items():
        def record(_m, args, name=name):
            r = ranges[name]
            r[0], r[1] = min(r[0], float(args[0].min())), max(r[1], float(args[0].max()))
        handles.append(module.register_forward_pre_hook(record))
    try:
        for x, _ in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: (lo, hi) for n, (lo, hi) in ranges.items()}


def fake_int8_weight(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Symmetric int8 weights in [-127, 127], per output channel or per tensor (zero stays 0)."""
    if per_channel:
        amax = w.detach().abs().flatten(1).amax(1).clamp(min=1e-12)
        scale = (amax / INT8_WEIGHT_MAX).float()
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -127, 127)
    scale = float(w.detach().abs().max().clamp(min=1e-12)) / INT8_WEIGHT_MAX
    return torch.fake_quantize_per_tensor_affine(w.float(), scale, 0, -127, 127)


def _int8_alone(model: nn.Module, module: nn.Module, w: nn.Parameter, rng: tuple[float, float],
                batches: Batches, device) -> dict[str, float]:
    """The model with only this layer int8: its weight and its input (uint8 affine over the
    calibrated range, zero exactly representable)."""
    lo, hi = min(rng[0], 0.0), max(rng[1], 0.0)
    scale = max(hi - lo, 1e-8) / 255
    zero_point = int(round(-lo / scale))

    def quantize_input(_m, args):
        return (torch.fake_quantize_per_tensor_affine(args[0], scale, zero_point, 0, 255),
                *args[1:])

    original = w.detach().clone()
    handle = module.register_forward_pre_hook(quantize_input)
    try:
        w.copy_(fake_int8_weight(original).to(w.dtype))
        return _measure(model, batches, device)
    finally:
        handle.remove()
        w.copy_(original)


@torch.no_grad()
def int8_drops(model: nn.Module, names: Sequence[str], batches: Batches,
               device: torch.device | str = "cpu") -> tuple[dict[str, float], dict[str, float]]:
    """(validation top-1 of the float model, {layer: top-1 drop in points when only it is
    int8}); the model comes back unchanged."""
    model = model.to(device).eval()
    modules = modules_of(model, names)
    params = dict(model.named_parameters())
    dense = _measure(model, batches, device)
    ranges = input_ranges(model, modules, batches)
    drops = {n: dense["top1"] - _int8_alone(model, modules[n], params[n], ranges[n], batches,
                                            device)["top1"] for n in names}
    return dense, drops


# -- reading a record --------------------------------------------------------------------------------


def loss_curves(record: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """{layer: [(sparsity, validation loss increase)]}: the input of ``allocation: sensitivity``."""
    base = record["dense"]["loss"]
    return {n: [(p["sparsity"], p["loss"] - base) for p in row["sparsity"]]
            for n, row in record["layers"].items() if row["sparsity"]}


def bits_curves(record: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """{layer: [(bits, validation loss increase)]}: the input of bits under a bytes budget."""
    base = record["dense"]["loss"]
    return {n: [(p["bits"], p["loss"] - base) for p in row["bits"]]
            for n, row in record["layers"].items() if row["bits"]}


def markdown_table(record: dict[str, Any]) -> str:
    """Validation top-1 of each layer alone at each scan point (loss increase in brackets)."""
    dense = record["dense"]
    layers = record["layers"]
    first = next(iter(layers.values()), {"sparsity": [], "bits": []})
    heads = ([f"s={p['sparsity']:.2f}" for p in first["sparsity"]]
             + [f"{p['bits']} bits" for p in first["bits"]]
             + (["int8"] if "int8" in first else []))
    lines = [f"Sensitivity on the {record['split']} split ({record['images']} images): "
             f"unchanged model top-1 {dense['top1']:.2f}%, loss {dense['loss']:.4f}. "
             "Each cell: top-1 % with only that layer changed (loss increase).", "",
             "| layer | family | params | " + " | ".join(heads) + " |",
             "|---|---|---:|" + "---:|" * len(heads)]
    for name, row in layers.items():
        points = row["sparsity"] + row["bits"] + ([row["int8"]] if "int8" in row else [])
        cells = [f"{p['top1']:.2f} ({p['loss'] - dense['loss']:+.3f})" for p in points]
        lines.append(f"| {name.removesuffix('.weight')} | {row['family']} | {row['params']:,} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
