"""The one place that measures: accuracy and loss, parameter counts, sparsity, bytes on disk."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .errors import MaskViolation


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
             predictions: list[torch.Tensor] | None = None) -> dict:
    """Top-1 (and top-5 when there are ≥ 5 classes) in percent, and mean cross-entropy.

    ``predictions``, when given, receives each batch's top-1 classes (on the CPU, in the
    loader's order), so that callers comparing models need no second pass."""
    was_training = model.training
    model.eval()
    total, loss_sum, correct1, correct5 = 0, 0.0, 0, 0
    num_classes = None
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x).float()
        num_classes = logits.shape[1]
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, num_classes), dim=1).indices
        # argmax, as a consumer of the file computes it: the first of tied maxima (quantized
        # logits tie often; topk breaks ties in no documented order)
        pred = logits.argmax(1)
        correct1 += (pred == y).sum().item()
        if predictions is not None:
            predictions.append(pred.cpu())
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
        total += y.numel()
    model.train(was_training)
    if total == 0:
        raise ValueError("evaluation set is empty")
    out = {"top1": 100.0 * correct1 / total, "loss": loss_sum / total}
    if num_classes is not None and num_classes >= 5:
        out["top5"] = 100.0 * correct5 / total
    return out


def param_counts(model: nn.Module) -> dict[str, float]:
    """Parameters, nonzero parameters and the resulting sparsity (over all parameters)."""
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    return {
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": 1.0 - nonzero / params if params else 0.0,
    }


def mask_stats(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sparsity of the masked tensors together and of each one (measured on the weights)."""
    params = dict(model.named_parameters())
    zeros = total = 0
    per_layer = {}
    for name in masks:
        p = params[name].detach()
        z = int(p.numel() - torch.count_nonzero(p))
        per_layer[name] = z / p.numel()
        zeros, total = zeros + z, total + p.numel()
    return {"masked_sparsity": zeros / max(total, 1), "per_layer": per_layer}


def file_bytes(paths: Iterable[str | os.PathLike]) -> int:
    """Sum of the sizes of real files on disk, as the filesystem reports them."""
    return sum(Path(p).stat().st_size for p in paths)


def check_masks(model: nn.Module, masks: dict[str, torch.Tensor], stage: str) -> None:
    """Raise MaskViolation if any weight a mask prunes is not exactly zero."""
    check_tensor_masks(dict(model.named_parameters()), masks, f"stage {stage!r}")


def check_tensor_masks(tensors: Mapping[str, torch.Tensor], masks: dict[str, torch.Tensor],
                       where: str, container: str = "the model") -> int:
    """Raise MaskViolation unless every pruned weight is an exact zero in ``tensors`` (a model's
    parameters or a file's tensors, named ``container`` in messages); return how many masked
    tensors were checked."""
    for name, mask in masks.items():
        if name not in tensors:
            raise MaskViolation(f"{where}: masked tensor {name!r} is not in {container}")
        value = tensors[name].detach()
        if value.shape != mask.shape:
            raise MaskViolation(f"{where}: {name!r} has shape {list(value.shape)} in "
                                f"{container}, its mask {list(mask.shape)}")
        revived = int(torch.count_nonzero(value[~mask.bool().to(value.device)]))
        if revived:
            raise MaskViolation(f"{where}: {revived} pruned weights of {name!r} are not zero "
                                f"in {container}")
    return len(masks)


# -- compute and speed ----------------------------------------------------------------------------


def _sdpa_cpu_macs_formula():
    """FlopCounterMode knows the CUDA attention kernels but not the CPU one; same formula."""
    def flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    # keyed by the op packet, as FlopCounterMode looks ops up
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: flops} if op is not None else {}


@torch.no_grad()
def count_macs(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> dict[str, int]:
    """Multiply-accumulates of one forward pass on an input of ``input_shape`` (batch included),
    and the parameter count.

    MACs are counted by torch's FlopCounterMode at the aten level (convolutions, matrix
    products, attention); one MAC is two FLOPs. Norms, activations and additions are not MACs.
    """
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        x = torch.zeros(tuple(input_shape), device=device, dtype=dtype)
        counter = FlopCounterMode(display=False, custom_mapping=_sdpa_cpu_macs_formula())
        with counter:
            model(x)
    finally:
        model.train(was_training)
    return {"macs": int(counter.get_total_flops()) // 2,
            "params": sum(p.numel() for p in model.parameters())}


def median_seconds(fn, repeats: int = 20, warmup: int = 3, sync=None) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls;
    ``sync()`` (e.g. a CUDA synchronize) runs before the clock starts and before it stops."""
    for _ in range(max(warmup, 0)):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        if sync is not None:
            sync()
        started = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.no_grad()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...] | list[int], batch: int = 1,
                    repeats: int = 20, warmup: int = 3, threads: int | None = None) -> float:
    """Median wall-clock seconds of one eval-mode forward pass on a batch of ``batch`` inputs of
    per-sample shape ``input_shape[1:]`` (``input_shape[0]`` is ignored).

    ``threads`` fixes torch's intra-op thread count for the measurement (restored after), so
    numbers taken in one run are comparable. On a shared machine, interleave the models you
    compare and repeat; the median discards most interference.
    """
    was_training = model.training
    model.eval()
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.randn((batch, *tuple(input_shape)[1:]), device=device)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
        return median_seconds(lambda: model(x), repeats, warmup, sync)
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)


def compare_latency(models: dict[str, nn.Module], input_shape: tuple[int, ...] | list[int],
                    batch: int = 1, repeats: int = 10, rounds: int = 3, warmup: int = 3,
                    threads: int | None = 1) -> dict[str, float]:
    """Median seconds per forward pass of each model, measured in interleaved rounds (A, B, A,
    B, ...) so that load from other processes hits every model alike."""
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(max(rounds, 1)):
        for name, model in models.items():
            samples[name].append(measure_latency(model, input_shape, batch=batch, repeats=repeats,
                                                 warmup=warmup, threads=threads))
    return {name: statistics.median(values) for name, values in samples.items()}
