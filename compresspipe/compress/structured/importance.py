"""Channel importance: one score per prunable unit of every group, higher is kept.

``make_importance`` wraps Torch-Pruning's estimators (L1/L2 filter norm, BatchNorm scale, FPGM,
first-order Taylor; ``CRITERIA``), ``unit_scores`` turns one into a score per channel or head.
Taylor needs gradients (``accumulate_gradients``); network slimming trains the BatchNorm scales
of the prunable groups (``group_batchnorms``) towards zero first (``BatchNormL1``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import CompressPipeError
from ...core.structure import BATCHNORM
from ...core.training import TrainHook
from .graph import StructuredGraph

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

CRITERIA = ("l1", "l2", "bn_scale", "fpgm", "taylor")


def make_importance(criterion: str):
    """A Torch-Pruning importance estimator for one of ``CRITERIA``.

    Every estimator sums over the coupled layers of a group and divides by the group's mean,
    so that scores of different groups compare in global ranking.
    """
    import torch_pruning as tp  # lazy: seconds to import; only structured stages run it

    imp = tp.importance
    if criterion == "l1":
        return imp.GroupMagnitudeImportance(p=1)
    if criterion == "l2":
        return imp.GroupMagnitudeImportance(p=2)
    if criterion == "bn_scale":
        return imp.BNScaleImportance()
    if criterion == "fpgm":
        return imp.FPGMImportance()
    if criterion == "taylor":
        return imp.GroupTaylorImportance()
    raise CompressPipeError(f"unknown structured pruning criterion {criterion!r} "
                            f"(known: {', '.join(CRITERIA)})")


def accumulate_gradients(model: nn.Module, loader: DataLoader, device: torch.device,
                         batches: int) -> None:
    """Sum the cross-entropy gradients of ``batches`` training batches into ``.grad`` (what the
    first-order Taylor criterion multiplies with the weights). Eval mode: BN statistics stay."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        for i, (x, y) in enumerate(loader):
            if i >= batches:
                break
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
    finally:
        model.train(was_training)


def group_batchnorms(graph: StructuredGraph) -> list[nn.Module]:
    """BatchNorm layers inside prunable groups: the scales network slimming regularises."""
    seen: dict[int, nn.Module] = {}
    for g in graph.groups:
        for it in g.items:
            m = it.dep.target.module
            if isinstance(m, BATCHNORM) and m.affine:
                seen[id(m)] = m
    return list(seen.values())


class BatchNormL1(TrainHook):
    """Network slimming's sparsity term, lambda * sum |gamma| (Liu et al. 2017), as a loss."""

    def __init__(self, layers: list[nn.Module], weight: float):
        self.layers, self.weight = layers, weight

    def extra_loss(self, model, inputs, outputs, targets) -> dict[str, torch.Tensor]:
        return {"bn_l1": self.weight * sum(m.weight.abs().sum() for m in self.layers)}


def unit_scores(graph: StructuredGraph, importance) -> list[torch.Tensor | None]:
    """Per group, one score per prunable unit (higher is kept); None when the criterion has
    nothing to read in that group (e.g. BN scale in a group without BatchNorm)."""
    scores: list[torch.Tensor | None] = []
    for g in graph.groups:
        full = graph.dg.get_pruning_group(g.root, g.root_fn, list(range(g.size)))
        try:
            imp = importance(full)
        except AttributeError as exc:  # Taylor without gradients
            raise CompressPipeError(f"criterion cannot score group {g.name}: {exc} (did every "
                                    "layer take part in the forward pass?)") from exc
        if imp is None:
            scores.append(None)
            continue
        imp = imp.detach().float().cpu()
        imp = torch.nan_to_num(imp, nan=0.0, posinf=0.0)
        scores.append(imp.view(g.units, g.unit).mean(1) if g.unit > 1 else imp)
    return scores
