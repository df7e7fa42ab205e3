"""Which weights take part, and how a sparsity target becomes masks (scope × granularity).

Scope: ``global`` ranks all participating weights together; ``layer`` gives every layer the same
sparsity; per-layer ``overrides`` fix a layer's sparsity whatever the scope. Granularity:
``unstructured`` or ``N:M`` (keep N of every M consecutive weights along the input dimension).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ...core.errors import CompressPipeError
from .allocation import AllocationInput, Curve, allocate

Masks = dict[str, torch.Tensor]


@dataclass
class Targets:
    """Participating weights and each one's sparsity rule."""

    names: list[str]
    half_rate: set[str] = field(default_factory=set)  # pruned at half the target sparsity
    overrides: dict[str, float] = field(default_factory=dict)  # fixed sparsity per layer
    min_keep: float = 0.0  # every layer keeps at least this fraction (≥ 1 weight if > 0)
    allocation: str | None = None  # a rule of allocation.py splitting the pooled target
    curves: dict[str, Curve] = field(default_factory=dict)  # sensitivity scan, for that rule


def prunable_weights(model: nn.Module) -> list[str]:
    """Weights of Conv and Linear layers, in registration order."""
    return [f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear)]


def classifier_weight(model: nn.Module) -> str | None:
    """The classifier's weight: timm's get_classifier() when available, else the last Linear."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        for name, m in model.named_modules():
            if m is head and isinstance(m, nn.Linear | nn.Conv2d):
                return f"{name}.weight"
    linears = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def select_targets(model: nn.Module, include: list[str], exclude: list[str], first_layer: str,
                   classifier: str, overrides: dict[str, float], min_keep: float = 0.0) -> Targets:
    """Apply include/exclude patterns (fnmatch on parameter names) and the edge-layer policy."""
    names = prunable_weights(model)
    if include:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in include)]
    names = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in exclude)]
    half: set[str] = set()
    edges = {"first_layer": (prunable_weights(model)[:1] or [None])[0],
             "classifier": classifier_weight(model)}
    for policy, name in ((first_layer, edges["first_layer"]), (classifier, edges["classifier"])):
        if name in names and policy == "exclude":
            names.remove(name)
        elif name in names and policy == "half":
            half.add(name)
    fixed = {}
    for pattern, sparsity in overrides.items():
        for n in names:
            if fnmatch.fnmatch(n, pattern):
                fixed[n] = sparsity
    return Targets(names=names, half_rate=half, overrides=fixed, min_keep=min_keep)


def scheduled_overrides(overrides: dict[str, float], sparsity: float,
                        target: float) -> dict[str, float]:
    """Each layer's fixed sparsity at a step of a schedule that is at ``sparsity`` of its
    ``target``: the layer has come as far along its own log-density path, 1 − (1 − o)^k with
    k = ln(1 − sparsity) / ln(1 − target). IMP's rounds then prune every overridden layer by
    the same fraction of its survivors per round, as Han et al. do per layer, instead of
    jumping to the final rate in the first round."""
    if sparsity >= target or target <= 0:
        return dict(overrides)
    k = math.log1p(-sparsity) / math.log1p(-target)
    return {name: 1.0 - (1.0 - o) ** k for name, o in overrides.items()}


def compute_masks(scores: dict[str, torch.Tensor], targets: Targets, sparsity: float, scope: str,
                  granularity: str = "unstructured", previous: Masks | None = None) -> Masks:
    """Masks reaching ``sparsity`` over the targets; weights already pruned stay pruned.

    Exact: a layer (or the global pool) of n weights keeps exactly n − round(s·n) of them.
    With ``targets.min_keep`` no layer drops below that density: in the global pool each layer's
    best weights are reserved first (the total stays exact); a layer-wise target is raised.
    """
    previous = previous or {}
    if granularity != "unstructured":
        n, m = parse_nm(granularity)
        return {name: nm_mask(scores[name], n, m, previous.get(name)) for name in targets.names}
    # pruned weights must never come back: give them the lowest possible score
    ranked = {k: _with_previous(scores[k], previous.get(k)) for k in targets.names}
    masks: Masks = {}
    pooled = []
    floor = targets.min_keep
    for name in targets.names:
        if name in targets.overrides:
            masks[name] = _keep_top(ranked[name], targets.overrides[name], floor)
        elif name in targets.half_rate:
            masks[name] = _keep_top(ranked[name], sparsity / 2, floor)
        elif scope == "layer":
            masks[name] = _keep_top(ranked[name], sparsity, floor)
        else:
            pooled.append(name)
    if pooled and targets.allocation is not None:
        masks.update(allocated_masks(ranked, pooled, targets, sparsity))
    elif pooled:
        flat = torch.cat([_reserve(ranked[n], floor).flatten() for n in pooled])
        keep = _keep_top(flat, sparsity)
        offset = 0
        for name in pooled:
            size = ranked[name].numel()
            masks[name] = keep[offset: offset + size].view_as(ranked[name])
            offset += size
    return masks


def allocated_masks(ranked: dict[str, torch.Tensor], pooled: list[str], targets: Targets,
                    sparsity: float) -> Masks:
    """Masks of the pooled layers with each layer's count from the allocation rule: together
    they keep exactly N − round(s·N) of their N weights (unless the floors alone keep more)."""
    total = sum(ranked[n].numel() for n in pooled)
    floors = {n: min(_floor_count(ranked[n].numel(), targets.min_keep),
                     int(torch.isfinite(ranked[n]).sum())) for n in pooled}
    try:
        counts = allocate(targets.allocation, AllocationInput(
            names=pooled, scores={n: ranked[n] for n in pooled},
            shapes={n: tuple(ranked[n].shape) for n in pooled}, floors=floors,
            keep_total=total - int(round(sparsity * total)), curves=targets.curves))
    except KeyError as exc:
        raise CompressPipeError(f"allocation {targets.allocation!r}: {exc.args[0]}") from None
    return {n: _keep_count(ranked[n], counts[n]) for n in pooled}


def _keep_count(score: torch.Tensor, keep: int) -> torch.Tensor:
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if keep > 0:
        mask[torch.topk(score.flatten(), keep, sorted=False).indices] = True
    return mask.view_as(score)


def floor_bound(masks: Masks, targets: Targets) -> list[str]:
    """Layers that keep exactly their ``min_layer_keep`` floor (where the floor decides)."""
    return [n for n, m in masks.items()
            if targets.min_keep > 0 and n not in targets.overrides
            and int(m.sum()) == _floor_count(m.numel(), targets.min_keep) < m.numel()]


def _with_previous(score: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    score = score.float()
    if mask is None:
        return score
    return torch.where(mask.to(score.device).bool(), score, torch.full_like(score, -float("inf")))


def _floor_count(n: int, floor: float) -> int:
    return max(1, math.ceil(floor * n)) if floor > 0 else 0


def _reserve(score: torch.Tensor, floor: float) -> torch.Tensor:
    """Scores with the layer's best ``floor`` fraction lifted to +inf (never pruned by the pool)."""
    k = _floor_count(score.numel(), floor)
    if k == 0:
        return score
    out = score.clone()
    top = torch.topk(out.flatten(), k).indices
    alive = torch.isfinite(out.flatten()[top])  # an already-pruned weight is not revived
    out.view(-1)[top[alive]] = float("inf")
    return out


def _keep_top(score: torch.Tensor, sparsity: float, floor: float = 0.0) -> torch.Tensor:
    """Boolean mask keeping the highest-scoring n − round(sparsity·n) entries, exactly
    (or the floor's count, if larger)."""
    n = score.numel()
    keep = max(n - int(round(sparsity * n)), _floor_count(n, floor))
    mask = torch.zeros(n, dtype=torch.bool, device=score.device)
    if keep > 0:
        # topk on a stable order: ties are broken by position, so the result is deterministic
        mask[torch.topk(score.flatten(), keep, sorted=False).indices] = True
    return mask.view_as(score)


def parse_nm(granularity: str) -> tuple[int, int]:
    """'2:4' -> (2, 4)."""
    n, _, m = granularity.partition(":")
    return int(n), int(m)


def nm_layout(weight: torch.Tensor) -> torch.Tensor:
    """View with the input dimension last: Linear (out, in); Conv (out, kh, kw, in)."""
    return weight.movedim(1, -1) if weight.dim() > 2 else weight


def nm_mask(score: torch.Tensor, n: int, m: int, previous: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the N highest scores in each group of M consecutive weights along the input dim."""
    ranked = _with_previous(score, previous)
    laid = nm_layout(ranked)
    if laid.shape[-1] % m:
        raise ValueError(f"input dimension {laid.shape[-1]} is not a multiple of M={m}")
    groups = laid.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    keep = keep.view(laid.shape)
    return keep.movedim(-1, 1) if score.dim() > 2 else keep


def layer_sparsity(masks: Masks) -> dict[str, float]:
    return {n: 1.0 - m.float().mean().item() for n, m in masks.items()}


def overall_sparsity(masks: Masks) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / max(total, 1)
