"""The one place that measures: accuracy and loss, parameter counts, sparsity, bytes on disk."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .errors import MaskViolation


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> dict:
    """Top-1 (and top-5 when there are ≥ 5 classes) in percent, and mean cross-entropy."""
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
        correct1 += (top[:, 0] == y).sum().item()
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
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise MaskViolation(f"stage {stage!r}: masked tensor {name!r} is not in the model")
        revived = int(torch.count_nonzero(params[name].detach()[~mask.bool()]))
        if revived:
            raise MaskViolation(
                f"stage {stage!r}: {revived} pruned weights of {name!r} are no longer zero"
            )
