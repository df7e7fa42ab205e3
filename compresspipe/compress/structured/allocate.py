"""Which units to remove, and their physical removal.

``allocate`` picks, from per-unit scores, the removals that bring channels, parameters or MACs
(``TARGETS``) down to a target within ``TOLERANCE`` — ranked across all groups (``global``) or
the same fraction of every group (``uniform``), each group capped and optionally rounded to
hardware-friendly widths. ``remove_units`` then removes them group by group through the
dependency graph, slicing unstructured masks alike, and checks that the network still runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...core.errors import CompressPipeError
from .cost import CostModel
from .graph import ChannelGroup, StructuredGraph
from .probe import forward_shape

TARGETS = ("channels", "params", "macs")
TOLERANCE = 0.02  # a budget counts as met within 2% of its target value


@dataclass
class Allocation:
    removals: list[torch.Tensor]  # per group: unit indices to remove
    predicted: dict[str, float]  # cost after removal
    target_value: float


def allocate(graph: StructuredGraph, cost: CostModel, scores: Sequence[torch.Tensor | None],
             target: str, target_value: float, scope: str = "global",
             max_ratio: float = 0.9, round_to: int = 1) -> Allocation:
    """Remove the lowest-scoring units until ``target`` ("channels", "params" or "macs") is at
    most ``target_value``, removing as little as possible beyond it.

    ``global`` ranks all units of all groups together; ``uniform`` removes the same fraction of
    every group. No group loses more than ``max_ratio`` of its units or all of them; groups
    without scores keep their width; ``round_to`` keeps channel counts at multiples of it.
    """
    if target not in TARGETS:
        raise CompressPipeError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    groups = graph.groups
    order = [torch.argsort(s, stable=True) if s is not None else None for s in scores]
    caps = [_cap(g, max_ratio, round_to) if s is not None else 0
            for g, s in zip(groups, scores, strict=True)]

    def removals_for(counts: Sequence[int]) -> list[torch.Tensor]:
        return [o[:_rounded(g, c, round_to)] if o is not None else torch.empty(0, dtype=torch.long)
                for g, o, c in zip(groups, order, counts, strict=True)]

    def value(counts: Sequence[int]) -> float:
        return cost.evaluate_removals(removals_for(counts))[target]

    if value(caps) > target_value * (1 + TOLERANCE):
        best = cost.evaluate_removals(removals_for(caps))[target]
        raise CompressPipeError(
            f"cannot reduce {target} to {target_value:,.0f}: removing the most allowed "
            f"(max_layer_ratio={max_ratio}) still leaves {best:,.0f}; raise max_layer_ratio, "
            f"ignore fewer layers or lower the ratio")
    if scope == "global":
        counts = _global_counts(scores, caps, value, target_value)
    elif scope == "uniform":
        counts = _uniform_counts(groups, caps, value, target_value)
    else:
        raise CompressPipeError(f"unknown scope {scope!r} (global | uniform)")
    removals = removals_for(counts)
    return Allocation(removals, cost.evaluate_removals(removals), target_value)


def _cap(g: ChannelGroup, max_ratio: float, round_to: int) -> int:
    """The most units this group may lose: at least one unit (round_to channels) stays."""
    keep_min = max(1, math.ceil(g.units * (1 - max_ratio)))
    if g.kind == "channels" and round_to > 1:
        keep_min = max(keep_min, min(round_to, g.units))
    return max(g.units - keep_min, 0)


def _rounded(g: ChannelGroup, count: int, round_to: int) -> int:
    """Units to remove so the kept channel count is a multiple of round_to (rounded up)."""
    if g.kind != "channels" or round_to <= 1 or count == 0:
        return count
    kept = min(g.units, math.ceil((g.units - count) / round_to) * round_to)
    return g.units - kept


def _global_counts(scores, caps, value, target_value) -> list[int]:
    """Take units in ascending score order (each group capped) until the target is met.

    Bisection finds the longest prefix that is not yet enough; after it, a unit whose removal
    would undershoot the target by more than the tolerance (a whole head, an expensive stem
    channel) is passed over for the next cheaper one, so the result lands within tolerance.
    """
    entries = sorted((float(s[i]), gi, int(i))
                     for gi, s in enumerate(scores) if s is not None
                     for i in torch.argsort(s, stable=True)[: caps[gi]])

    def counts_at(k: int) -> list[int]:
        counts = [0] * len(scores)
        for _, gi, _ in entries[:k]:
            counts[gi] += 1
        return counts

    lo, hi = 0, len(entries)
    while lo < hi:  # smallest k whose prefix meets the target
        mid = (lo + hi) // 2
        if value(counts_at(mid)) <= target_value:
            hi = mid
        else:
            lo = mid + 1
    if lo == 0:
        return counts_at(0)
    counts = counts_at(lo - 1)
    floor = target_value * (1 - TOLERANCE)
    blocked: set[int] = set()  # groups whose next unit is too big a step
    for _, gi, _ in entries[lo - 1:]:
        if gi in blocked or counts[gi] >= caps[gi]:
            continue
        trial = counts.copy()
        trial[gi] += 1
        v = value(trial)
        if v < floor:
            blocked.add(gi)
            continue
        counts = trial
        if v <= target_value:
            return counts
    return counts_at(lo)


def _uniform_counts(groups, caps, value, target_value) -> list[int]:
    """The same fraction t of every group (bisection on t), then single units from the groups
    furthest below t until the target is met, so no group strays more than one unit; a unit
    that would undershoot the target by more than the tolerance is passed over."""

    def counts_at(t: float) -> list[int]:
        return [min(cap, int(t * g.units)) for g, cap in zip(groups, caps, strict=True)]

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if value(counts_at(mid)) <= target_value:
            hi = mid
        else:
            lo = mid
    counts = counts_at(lo)
    floor = target_value * (1 - TOLERANCE)
    while value(counts) > target_value:
        open_ = sorted((i for i, (c, cap) in enumerate(zip(counts, caps, strict=True)) if c < cap),
                       key=lambda j: (counts[j] + 1) / groups[j].units)
        if not open_:
            break
        trials = [[c + (i == j) for i, c in enumerate(counts)] for j in open_]
        counts = next((t for t in trials if value(t) >= floor), trials[0])
    return counts


def remove_units(graph: StructuredGraph, removals: Sequence[torch.Tensor],
                 masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Physically remove the given units group by group; return the masks sliced alike.

    Unstructured masks ride along as the gradients of their parameters, which Torch-Pruning
    slices together with the weights, so every kept weight keeps its own mask bit. A forward
    pass afterwards checks that the network still runs with the same output shape; a failure
    names the pruned groups instead of leaving a wrong model.
    """
    model = graph.model
    masks = masks or {}
    params = dict(model.named_parameters())
    missing = [n for n in masks if n not in params]
    if missing:
        raise CompressPipeError(f"masks name parameters the model does not have: {missing[:3]}")
    model.zero_grad(set_to_none=True)
    for name, mask in masks.items():
        params[name].grad = mask.to(params[name].device, params[name].dtype).clone()
    x = graph.example_input()
    expected = forward_shape(model, x)
    pruned = []
    for g, units in zip(graph.groups, removals, strict=True):
        if units.numel() == 0:
            continue
        group = graph.dg.get_pruning_group(g.root, g.root_fn, g.channels_of(units))
        group.prune()
        if g.attention is not None:
            g.attention.set_heads(g.attention.heads - units.numel())
        pruned.append(g.name)
    names = ", ".join(pruned[:8]) + (f" and {len(pruned) - 8} more" if len(pruned) > 8 else "")
    try:
        shape = forward_shape(model, x)
    except Exception as exc:
        raise CompressPipeError(f"removing channels of groups {names} breaks the forward pass "
                                f"of {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
    if shape != expected:
        raise CompressPipeError(f"removing channels of groups {names} changed the output shape "
                                f"from {expected} to {shape}")
    params = dict(model.named_parameters())
    sliced = {name: params[name].grad.detach().bool().cpu() for name in masks}
    model.zero_grad(set_to_none=True)
    return sliced
