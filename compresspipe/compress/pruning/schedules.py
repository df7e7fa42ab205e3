"""Schedules: how sparsity grows (IMP rounds, Zhu & Gupta's cubic curve) and which learning rate
retraining uses after each pruning step (FT, LRW, WR, SLR, CLR, LLR, ALLR).

An LR schedule here is a function ``(step, total_steps) -> lr`` that the training loop takes as
``lr_fn``. The *original* schedule is the dense training's, recorded in the artifact by the train
stage (``OriginalSchedule``), because LRW, SLR and ALLR are defined relative to it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...core.config import TrainConfig
from ...core.training import lr_at

LrFn = Callable[[int, int], float]


def imp_rate(target: float, rounds: int) -> float:
    """Fraction of the surviving weights pruned per round: 1 − (1 − s)^(1/n)."""
    return 1.0 - (1.0 - target) ** (1.0 / rounds)


def imp_sparsities(target: float, rounds: int) -> list[float]:
    """Cumulative sparsity after each round; the last is exactly the target."""
    return [1.0 - (1.0 - target) ** (r / rounds) for r in range(1, rounds + 1)]


def cubic_sparsity(step: int, s_i: float, s_f: float, t0: int, n: int, dt: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i − s_f)(1 − (t − t0)/(n·Δt))³, frozen after t0 + nΔt."""
    if step < t0:
        return 0.0
    progress = min(1.0, (step - t0) / (n * dt))
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3


@dataclass
class OriginalSchedule:
    """The dense training's LR schedule, replayable at any step."""

    cfg: TrainConfig
    steps_per_epoch: int

    @property
    def total(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    def lr(self, step: int) -> float:
        return lr_at(self.cfg, min(step, self.total - 1), self.total, self.steps_per_epoch)

    @property
    def eta_max(self) -> float:
        return max(self.lr(s) for s in range(0, self.total, max(1, self.total // 200)))

    @property
    def last_lr(self) -> float:
        return self.lr(self.total - 1)


def warmup_linear(peak: float, warmup: float = 0.1) -> LrFn:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` of the steps, then linear decay to 0."""

    def fn(step: int, total: int) -> float:
        w = max(1, int(round(warmup * total)))
        if step < w:
            return peak * (step + 1) / w
        return peak * max(0.0, 1.0 - (step - w) / max(1, total - w))

    return fn


def retrain_schedule(kind: str, original: OriginalSchedule, *, rewind_step: int = 0,
                     eta_init: float | None = None) -> LrFn:
    """The LR function for retraining after a prune step.

    ft: constant last LR of the original schedule; lrw / wr: the original schedule replayed
    from the rewind step (LRW without a recorded step replays its tail), mapped onto the retrain
    budget; slr: the whole original schedule compressed into the budget after a 10% warm-up;
    clr: 10% warm-up then a cosine from η_max to 0; llr: 10% warm-up then linear from η_max to 0;
    allr: 10% warm-up to ``eta_init`` then linear to 0 (Zimmer et al. 2023).
    """
    t_orig = original.total
    if kind == "ft":
        last = original.last_lr
        return lambda step, total: last
    if kind in ("lrw", "wr"):
        def replay(step: int, total: int) -> float:
            start = rewind_step if (kind == "wr" or rewind_step) else max(0, t_orig - total)
            return original.lr(start + int(step * (t_orig - start) / max(total, 1)))
        return replay
    if kind == "slr":
        def compressed(step: int, total: int) -> float:
            w = max(1, int(round(0.1 * total)))
            mapped = original.lr(int(step * t_orig / max(total, 1)))
            return mapped * (step + 1) / w if step < w else mapped
        return compressed
    if kind == "clr":
        eta = original.eta_max

        def cosine(step: int, total: int) -> float:
            w = max(1, int(round(0.1 * total)))
            if step < w:
                return eta * (step + 1) / w
            return eta * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))
        return cosine
    if kind == "llr":
        return warmup_linear(original.eta_max)
    if kind == "allr":
        if eta_init is None:
            raise ValueError("allr needs eta_init")
        return warmup_linear(eta_init)
    raise ValueError(f"unknown retrain schedule {kind!r}")


def norm_removed(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    """d = sqrt(|‖θ‖² − ‖θ_pruned‖²|) / ‖θ‖ over all weights and biases (ALLR)."""
    total = pruned = 0.0
    for name, p in model.named_parameters():
        sq = p.detach().double().pow(2)
        total += sq.sum().item()
        kept = sq[masks[name].bool()] if name in masks else sq
        pruned += kept.sum().item()
    return math.sqrt(abs(total - pruned)) / math.sqrt(total) if total else 0.0


def allr_eta_init(d: float, s: float, eta_max: float, t_retrain: float, t_train: float) -> float:
    """η_init = clip((d/√s)·η_max, min(T_retrain/T_train, 1)·η_max, η_max)."""
    low = min(t_retrain / t_train, 1.0) * eta_max if t_train > 0 else eta_max
    raw = (d / math.sqrt(s)) * eta_max if s > 0 else low
    return min(max(raw, low), eta_max)
