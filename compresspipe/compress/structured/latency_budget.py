"""Structured pruning to a measured latency budget instead of a MACs count.

MACs mislead where time goes to memory traffic, depthwise convolutions or fixed per-layer
overhead: 2x fewer MACs can be 1.2x faster, or slower. ``search_latency`` bisects the fraction
of MACs removed (with the usual allocation, so the channels chosen are those a MACs target
would choose) and times a physically narrowed copy at every step against the dense model,
interleaved in one process: the least pruning whose measured latency ratio meets the goal wins.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...core.errors import CompressPipeError
from ...core.measure import compare_latency
from .allocate import Allocation, remove_units
from .graph import StructuredGraph

# the most MACs a search tries to remove; lowered while the allocation cannot reach it
MAX_REMOVED = 0.95


@dataclass
class LatencyTrial:
    """One timed candidate: the MACs fraction removed and its measured latency ratio."""

    macs_removed: float
    latency_ratio: float  # pruned / dense seconds (the worst of the batch sizes timed)


@dataclass
class LatencySearch:
    """The chosen allocation, what it measured, and every trial on the way."""

    allocation: Allocation
    macs_removed: float
    latency_ratio: float
    trials: list[LatencyTrial] = field(default_factory=list)

    def record(self) -> dict:
        return {"macs_removed": self.macs_removed, "latency_ratio": self.latency_ratio,
                "trials": [vars(t) for t in self.trials]}


def pruned_copy(graph: StructuredGraph, removals: Sequence[torch.Tensor]) -> nn.Module:
    """A copy of ``graph.model`` with ``removals`` physically applied (the model is untouched).

    The copy's dependency graph is built afresh; its groups must be the original's, in order,
    because ``removals`` index them."""
    model = copy.deepcopy(graph.model).eval()
    twin = StructuredGraph(model, graph.input_shape, graph.ignore, budget_s=graph.budget_s,
                           verify=False)
    kept = {g.name for g in twin.groups}
    wanted = [(g, r) for g, r in zip(graph.groups, removals, strict=True)]
    missing = [g.name for g, r in wanted if r.numel() and g.name not in kept]
    if missing:
        raise CompressPipeError(f"latency search: the copy's dependency graph lacks groups "
                                f"{missing[:3]}")
    by_name = {g.name: r for g, r in wanted}
    twin_removals = [by_name.get(g.name, torch.empty(0, dtype=torch.long)) for g in twin.groups]
    remove_units(twin, twin_removals)
    return model.eval()


def latency_ratio(dense: nn.Module, model: nn.Module, shape: Sequence[int],
                  batch_sizes: Sequence[int], repeats: int, rounds: int, threads: int) -> float:
    """Pruned over dense seconds per forward pass, timed interleaved; the worst batch size."""
    ratios = []
    for batch in batch_sizes:
        times = compare_latency({"dense": dense, "pruned": model}, shape, batch=batch,
                                repeats=repeats, rounds=rounds, threads=threads)
        ratios.append(times["pruned"] / times["dense"])
    return max(ratios)


def search_latency(allocate_at: Callable[[float], Allocation],
                   measure: Callable[[Allocation], float], goal: float, iterations: int
                   ) -> LatencySearch:
    """The least MACs removal whose measured latency ratio is at most ``goal``.

    ``allocate_at(f)`` allocates removals for a fraction ``f`` of the MACs (raising
    CompressPipeError when the caps cannot reach it); ``measure`` times them. First the most
    that can be removed is timed (the budget must be reachable), then ``iterations`` bisection
    steps between nothing and that. Timings are noisy: the answer is the smallest fraction that
    measured within the goal twice (the bisection's and a second timing), not a claim of
    monotonicity.
    """
    top, allocation = MAX_REMOVED, None
    while allocation is None:
        try:
            allocation = allocate_at(top)
        except CompressPipeError:
            top -= 0.05
            if top <= 0.05:
                raise
    trials = [LatencyTrial(top, measure(allocation))]
    if trials[0].latency_ratio > goal:
        raise CompressPipeError(
            f"latency budget {goal:.2f}x of the incoming model is out of reach: removing "
            f"{top:.0%} of its MACs measured {trials[0].latency_ratio:.2f}x; raise the budget "
            "or max_layer_ratio, or ignore fewer layers")
    met = {top: allocation}  # removals whose measurement met the goal
    lo, hi = 0.0, top
    for _ in range(iterations):
        mid = (lo + hi) / 2
        candidate = allocate_at(mid)
        ratio = measure(candidate)
        trials.append(LatencyTrial(mid, ratio))
        if ratio <= goal:
            hi, met[mid] = mid, candidate
        else:
            lo = mid
    return _confirmed(met, measure, goal, trials)


def _confirmed(met: dict[float, Allocation], measure: Callable[[Allocation], float],
               goal: float, trials: list[LatencyTrial]) -> LatencySearch:
    """The smallest removal that meets the goal when timed again: on a shared machine one
    lucky measurement must not decide. The most removal is the last resort."""
    fractions = sorted(met)
    for fraction in fractions[:-1]:
        ratio = measure(met[fraction])
        trials.append(LatencyTrial(fraction, ratio))
        if ratio <= goal:
            return LatencySearch(met[fraction], fraction, ratio, trials)
    top = fractions[-1]
    return LatencySearch(met[top], top, trials[0].latency_ratio, trials)
