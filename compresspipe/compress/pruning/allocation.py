"""Per-layer allocation of one global sparsity target: how many weights each layer keeps so
that the pooled layers together keep exactly ``N − round(s·N)`` of their ``N`` weights.

Rules (``@register_allocation``), each ``(AllocationInput) -> {weight name: weights kept}``:

* ``global``: one ranking of every pooled weight by the criterion's score (the pool
  ``scope: global`` uses);
* ``uniform``: the same sparsity in every layer (±1 weight, the rounding that makes the total
  exact; a layer held at its floor passes its share to the others);
* ``erk``: Erdős–Rényi-Kernel (Evci et al. 2020, RigL): density of a layer ∝
  (n_in + n_out + k_h + k_w) / (n_in · n_out · k_h · k_w), i.e. sum(shape) / prod(shape) of its
  weight, scaled to the target; a layer whose density would exceed 1 stays dense and the others
  are re-scaled (the bisection below does RigL's loop in one go);
* ``lamp``: Lee et al. 2021: within a layer, sorted by score, a weight's score is
  u² / Σ_{v ≥ u} v² (its square over the sum of squares of itself and every larger one), then one
  global threshold; on the criterion's score (magnitude: the paper's |w|);
* ``sensitivity``: AIMET's greedy selection on a sensitivity scan: one level τ of validation-loss
  increase for every layer, each layer pruned to the largest sparsity whose (monotone, linearly
  interpolated) measured loss increase stays within τ, τ set by bisection to meet the target.

Every rule respects the floor (``min_layer_keep``: at least that fraction, ≥ 1 weight) and never
revives a weight an earlier mask pruned; only when the floors alone exceed the target (or the
survivors fall short of it) is the total not the target, and the caller sees it in the counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

# (sparsity of that layer alone, validation loss increase over the unpruned model) per layer
Curve = list[tuple[float, float]]


@dataclass
class AllocationInput:
    """The pooled layers of one prune step."""

    names: list[str]
    scores: dict[str, torch.Tensor]  # criterion scores, -inf where an earlier mask pruned
    shapes: dict[str, tuple[int, ...]]
    floors: dict[str, int]  # weights each layer keeps at least (≤ its survivors)
    keep_total: int  # N − round(s·N) over the pooled layers
    curves: dict[str, Curve] = field(default_factory=dict)  # for ``sensitivity``

    def sizes(self) -> np.ndarray:
        return np.array([math.prod(self.shapes[n]) for n in self.names], dtype=np.float64)

    def alive(self) -> np.ndarray:
        return np.array([int(torch.isfinite(self.scores[n]).sum()) for n in self.names],
                        dtype=np.float64)

    def floor_array(self) -> np.ndarray:
        return np.array([self.floors[n] for n in self.names], dtype=np.float64)


AllocationFn = Callable[[AllocationInput], dict[str, int]]
_RULES: dict[str, AllocationFn] = {}


def register_allocation(name: str) -> Callable[[AllocationFn], AllocationFn]:
    """Decorator: register an allocation rule under ``name`` (each name once)."""

    def add(fn: AllocationFn) -> AllocationFn:
        if name in _RULES:
            raise ValueError(f"allocation rule {name!r} is already registered")
        _RULES[name] = fn
        return fn

    return add


def allocate(rule: str, inp: AllocationInput) -> dict[str, int]:
    """Weights each pooled layer keeps under ``rule``; KeyError listing the known rules."""
    try:
        fn = _RULES[rule]
    except KeyError:
        raise KeyError(f"no allocation rule {rule!r}; known: {', '.join(_RULES)}") from None
    return fn(inp)


def allocation_names() -> list[str]:
    return list(_RULES)


# -- rules ranking weights across layers -----------------------------------------------------------


@register_allocation("global")
def global_rule(inp: AllocationInput) -> dict[str, int]:
    return _pool_counts(inp, inp.scores)


@register_allocation("lamp")
def lamp_rule(inp: AllocationInput) -> dict[str, int]:
    return _pool_counts(inp, {n: lamp_scores(inp.scores[n]) for n in inp.names})


def lamp_scores(score: torch.Tensor) -> torch.Tensor:
    """LAMP: s_u² / Σ_{v: s_v ≥ s_u} s_v² within the tensor; -inf entries (pruned) stay -inf."""
    alive = torch.isfinite(score)
    sq = torch.where(alive, score.double(), torch.zeros((), dtype=torch.float64)).square()
    flat = sq.flatten()
    order = torch.argsort(flat, stable=True)
    ascending = flat[order]
    # sum of the squares of this weight and every larger one (a reversed cumulative sum)
    tail = ascending.flip(0).cumsum(0).flip(0)
    lamp = torch.where(tail > 0, ascending / tail.clamp(min=1e-300), torch.zeros_like(tail))
    out = torch.empty_like(flat)
    out[order] = lamp
    return torch.where(alive, out.view_as(score), torch.full_like(out.view_as(score), -math.inf))


def _pool_counts(inp: AllocationInput, scores: dict[str, torch.Tensor]) -> dict[str, int]:
    """The best ``keep_total`` weights of the pool, each layer's floor reserved first."""
    alive = inp.alive()
    keep = int(min(max(inp.keep_total, inp.floor_array().sum()), alive.sum()))
    lifted = []
    for name in inp.names:
        s = scores[name].flatten().double().clone()
        k = inp.floors[name]
        if k:
            s[torch.topk(s, k).indices] = math.inf  # floors ≤ survivors: only live weights lifted
        lifted.append(s)
    flat = torch.cat(lifted)
    top = torch.topk(flat, keep, sorted=False).indices if keep else torch.zeros(0, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(inp.names)),
                                    torch.tensor([t.numel() for t in lifted]))
    counts = torch.bincount(owner[top], minlength=len(inp.names))
    return {n: int(c) for n, c in zip(inp.names, counts)}


# -- rules giving each layer a density ------------------------------------------------------------


@register_allocation("uniform")
def uniform_rule(inp: AllocationInput) -> dict[str, int]:
    n = inp.sizes()
    return _solve(inp, lambda t: t * n, 0.0, 1.0)


@register_allocation("erk")
def erk_rule(inp: AllocationInput) -> dict[str, int]:
    n = inp.sizes()
    raw = np.array([sum(inp.shapes[name]) / math.prod(inp.shapes[name]) for name in inp.names])
    return _solve(inp, lambda eps: eps * raw * n, 0.0, float(1.0 / raw.min()))


@register_allocation("sensitivity")
def sensitivity_rule(inp: AllocationInput) -> dict[str, int]:
    missing = [n for n in inp.names if n not in inp.curves]
    if missing:
        raise KeyError(f"the sensitivity scan has no curve for {', '.join(missing[:3])}"
                       + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    n = inp.sizes()
    curves = [monotone_curve(inp.curves[name]) for name in inp.names]
    tau_max = max(max(d for _, d in c) for c in curves) or 1.0
    at = lambda tau: n * (1 - np.array([sparsity_within(c, tau) for c in curves]))  # noqa: E731
    lowest = at(0.0)
    worst = at(tau_max)

    def family(t: float) -> np.ndarray:
        # t in [0,1]: from dense to the layers the scan shows free (no loss at all);
        # [1,2]: the common loss level τ rises; [2,3]: past the scanned grid, every layer
        # shrinks in proportion (a target beyond what the scan measured)
        if t <= 1:
            return n + t * (lowest - n)
        if t <= 2:
            return at((t - 1) * tau_max)
        return worst * (3 - t)

    return _solve(inp, family, 0.0, 3.0)


def monotone_curve(curve: Curve) -> Curve:
    """(0, 0) first, sorted by sparsity, increases clamped at ≥ 0 and made non-decreasing
    (a loss that falls at a higher sparsity is measurement noise, not a free lunch)."""
    points = sorted((float(s), float(d)) for s, d in curve if s > 0)
    out, level = [(0.0, 0.0)], 0.0
    for s, d in points:
        level = max(level, d, 0.0)
        out.append((s, level))
    return out


def sparsity_within(curve: Curve, tau: float) -> float:
    """The largest sparsity whose interpolated loss increase is ≤ ``tau`` on a monotone curve."""
    best = 0.0
    for (s0, d0), (s1, d1) in zip(curve, curve[1:]):
        if d1 <= tau:
            best = s1
            continue
        if d0 <= tau:
            best = s0 + (tau - d0) / (d1 - d0) * (s1 - s0)
        break
    return best


def _solve(inp: AllocationInput, family: Callable[[float], np.ndarray], a: float,
           b: float) -> dict[str, int]:
    """Integer keeps, within [floor, survivors] per layer, adding up to ``keep_total`` exactly.

    ``family(t)`` gives real keeps, monotone in t; bisection brackets the target between two
    values of t, the two clipped keep vectors are blended to hit it in reals, and the largest
    remainders round them to integers that add up exactly."""
    floors, caps = inp.floor_array(), inp.alive()
    total = float(min(max(inp.keep_total, floors.sum()), caps.sum()))
    clipped = lambda t: np.clip(family(t), floors, caps)  # noqa: E731
    lo, hi = (a, b) if clipped(a).sum() <= clipped(b).sum() else (b, a)
    for _ in range(200):  # bisection on t: the sums are monotone in it
        mid = (lo + hi) / 2
        if clipped(mid).sum() <= total:
            lo = mid
        else:
            hi = mid
    k_lo, k_hi = clipped(lo), clipped(hi)
    gap = k_hi.sum() - k_lo.sum()
    real = k_lo + ((total - k_lo.sum()) / gap if gap > 0 else 0.0) * (k_hi - k_lo)
    keeps = _integerize(np.clip(real, floors, caps), floors, caps, int(round(total)))
    return {n: int(k) for n, k in zip(inp.names, keeps)}


def _integerize(real: np.ndarray, floors: np.ndarray, caps: np.ndarray, total: int) -> np.ndarray:
    """Round down, then hand the missing units to the largest remainders (within the caps),
    or take surplus units from the smallest (above the floors)."""
    base = np.clip(np.floor(real + 1e-9), floors, caps)
    frac = real - base
    missing = total - int(base.sum())
    order = np.argsort(-frac, kind="stable")
    while missing > 0:
        room = [i for i in order if base[i] < caps[i]]
        for i in room[:missing]:
            base[i] += 1
        missing = total - int(base.sum())
        if not room:
            break
    while missing < 0:
        spare = [i for i in order[::-1] if base[i] > floors[i]]
        for i in spare[:-missing]:
            base[i] -= 1
        missing = total - int(base.sum())
        if not spare:
            break
    return base.astype(np.int64)
