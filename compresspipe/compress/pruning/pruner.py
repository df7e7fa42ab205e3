"""The state every pruning method shares and the pieces they compose: the participating weights
(targets), the masks (inherited from earlier stages and this stage's own), importance scores,
pruning to a sparsity, weight rewinding, one training phase through the run's loop, the round
log line, the retraining LR schedule and the record the artifact keeps.

A ``Pruner`` needs no stage: it gets a ``RunContext`` plus, from whoever runs it, the hooks to
add to every training phase (the prune stage's distillation) and the initial weights for
``rewind_to: init``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from ...core import artifact_keys
from ...core.artifact import Artifact
from ...core.config import TrainConfig
from ...core.context import RunContext
from ...core.errors import CompressPipeError
from ...core.masks import apply_masks
from ...core.training import LrFn, TrainHook
from .allocation import Curve
from .config import PruneConfig
from .criteria import CRITERIA, NEEDS_DATA, ScoreInput
from .schedules import OriginalSchedule, allr_eta_init, norm_removed, retrain_schedule
from .scopes import (
    Masks,
    compute_masks,
    floor_bound,
    layer_sparsity,
    overall_sparsity,
    scheduled_overrides,
    select_targets,
)

# the model being pruned -> hooks for one of its training phases (called once per phase)
PhaseHooks = Callable[[nn.Module], Sequence[TrainHook]]
# the model state weight rewinding returns to under ``rewind_to: init`` (loaded when needed)
InitialState = Callable[[], dict[str, torch.Tensor]]


class RecalibrateBatchNorm(TrainHook):
    """After a phase's last optimizer step (before its evaluation), BatchNorm running statistics
    become the exact average over ``batches`` training batches at the final weights.

    Why: at 99% sparsity most channels of a pruned network have no path from the input, so they
    feed the next layer a constant and its BatchNorm sees a variance near zero. The moving
    averages still hold a residue of the statistics of weights long gone (momentum 0.1 leaves
    0.9^n of them); divided by that near-zero variance the residue becomes huge activations
    in eval mode, while training (batch statistics) is consistent: the train loss falls and
    the evaluated model is at chance with a loss above ln 10.
    """

    def __init__(self, ctx: RunContext, batches: int):
        self.ctx, self.batches, self.total = ctx, batches, 0

    def on_train_start(self, trainer) -> None:
        self.total = trainer.total_steps

    def after_step(self, model: nn.Module, step: int) -> None:
        if step == self.total:
            recalibrate_batchnorm(model, self.ctx, self.batches)


def recalibrate_batchnorm(model: nn.Module, ctx: RunContext, batches: int) -> None:
    """Reset every BatchNorm's running statistics and average them over ``batches`` seeded
    training batches (the same on every process), the rest of the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    if not norms:
        return
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: cumulative average, every batch weighs the same
        m.train()
    device = next(model.parameters()).device
    loader = ctx.data.train_loader(torch.Generator().manual_seed(ctx.seed), shard=False)
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            model(x.to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


class Pruner:
    """State shared by the methods: the model, its targets, the masks and the phase counter."""

    def __init__(self, cfg: PruneConfig, artifact: Artifact, ctx: RunContext, *,
                 hooks: PhaseHooks | None = None, initial_state: InitialState | None = None,
                 curves: dict[str, Curve] | None = None):
        """``curves``: the sensitivity scan's loss curves, for ``allocation: sensitivity``."""
        self.cfg, self.artifact, self.ctx = cfg, artifact, ctx
        self.phase_hooks, self.initial_state = hooks, initial_state
        self.model = artifact.model.to(ctx.device)
        self.targets = select_targets(self.model, cfg.include, cfg.exclude, cfg.first_layer,
                                      cfg.classifier, cfg.overrides, cfg.min_layer_keep)
        if cfg.allocation is not None:
            self.targets.allocation = cfg.allocation.rule
            self.targets.curves = dict(curves or {})
        self.floor_warned = False
        self.inherited: Masks = dict(artifact.masks)  # from earlier stages: always kept
        self.masks: Masks = {n: m for n, m in artifact.masks.items() if n in self.targets.names}
        self.original = self._original_schedule()
        self.phase = 0
        self.logged_epochs = 0

    def _original_schedule(self) -> OriginalSchedule:
        info = artifact_keys.training(self.artifact)
        if info:
            return OriginalSchedule(TrainConfig(**info.config), info.steps_per_epoch)
        # no recorded dense training: this stage's own settings define the schedule
        return OriginalSchedule(self.cfg.train, max(1, len(self.ctx.data.train_loader())))

    def scores(self, seed_offset: int = 0) -> dict[str, torch.Tensor]:
        """The criterion's importance of every target weight (data criteria read a few batches)."""
        batches = []
        if self.cfg.criterion in NEEDS_DATA:
            g = torch.Generator().manual_seed(self.ctx.seed)
            loader = self.ctx.data.train_loader(g, shard=False)
            for i, batch in enumerate(loader):
                if i >= self.cfg.score_batches:
                    break
                batches.append(batch)
        inp = ScoreInput(
            model=self.model, targets=self.targets.names, batches=batches,
            masks=self.all_masks(), seed=self.ctx.seed + seed_offset,
            input_shape=(self.ctx.data.in_chans, self.ctx.data.image_size, self.ctx.data.image_size),
        )
        return CRITERIA[self.cfg.criterion](inp)

    def all_masks(self) -> Masks:
        """The inherited masks and this stage's own (which win where both mask a weight)."""
        return {**self.inherited, **self.masks}

    def prune_to(self, sparsity: float, scores: dict[str, torch.Tensor] | None = None) -> dict:
        """Recompute masks at ``sparsity``, zero the pruned weights; return phase statistics."""
        before = sum(int(m.sum()) for m in self.masks.values()) if self.masks else sum(
            dict(self.model.named_parameters())[n].numel() for n in self.targets.names)
        targets = replace(self.targets, overrides=scheduled_overrides(
            self.targets.overrides, sparsity, self.cfg.target_sparsity()))
        new = compute_masks(scores if scores is not None else self.scores(self.phase),
                            targets, sparsity, self.cfg.scope, self.cfg.granularity,
                            previous=self.masks)
        d = norm_removed(self.model, {**self.all_masks(), **new})
        self.masks = {n: m.cpu() for n, m in new.items()}
        self.apply_masks()
        after = sum(int(m.sum()) for m in self.masks.values())
        bound = floor_bound(self.masks, self.targets)
        self._note_floor(bound)
        return {"d": d, "phase_fraction": (before - after) / max(before, 1),
                "floor_bound_layers": float(len(bound))}

    def _note_floor(self, bound: list[str]) -> None:
        """Say once when min_layer_keep, not the allocation, decides layers' sparsity: where it
        binds in every layer, a global ranking has silently become uniform at the floor."""
        if not bound or self.floor_warned:
            return
        self.floor_warned = True
        rule = self.cfg.allocation.rule if self.cfg.allocation else self.cfg.scope
        pooled = [n for n in self.targets.names if n not in self.targets.overrides]
        every = len(bound) >= len(pooled)
        print(f"[{self.ctx.name}] warning: min_layer_keep ({self.cfg.min_layer_keep:g}) binds in "
              f"{len(bound)} of {len(pooled)} layers ({', '.join(b.removesuffix('.weight') for b in bound[:4])}"
              f"{', ...' if len(bound) > 4 else ''})"
              + (f": allocation {rule!r} has become uniform at the floor" if every else
                 f": there the floor, not allocation {rule!r}, sets the sparsity"), flush=True)

    def apply_masks(self) -> None:
        """Zero every masked weight of the model."""
        apply_masks(self.model, self.all_masks())

    def rewind(self) -> None:
        """Weight rewinding: surviving weights (and BN statistics) back to the rewind point."""
        if self.cfg.rewind_to == "init":
            if self.initial_state is None:
                raise CompressPipeError(f"stage {self.ctx.name!r}: rewind_to 'init' needs the "
                                        "initial weights, and none were given")
            state = self.initial_state()
        else:
            state = artifact_keys.rewind_state(self.artifact)
            if not state:
                raise CompressPipeError(
                    f"stage {self.ctx.name!r}: the incoming artifact has no recorded rewind "
                    "point; add record_rewind to the train stage before it")
        own = self.model.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)
        self.apply_masks()

    def rewind_step(self) -> int:
        """The optimizer step of the rewind point (0 for the initial weights)."""
        if self.cfg.rewind_to == "init":
            return 0
        return artifact_keys.rewind_step(self.artifact)

    def train(self, epochs: int, lr_fn: LrFn | None = None, key: str | None = None,
              lr_scale: float = 1.0, extra_hooks: list[TrainHook] | None = None,
              masks: Masks | None = None, model: nn.Module | None = None,
              phase_hooks: bool = True) -> dict[str, float]:
        """One training phase through the pipeline's loop; returns its last epoch's metrics.

        ``phase_hooks`` False leaves out the hooks given at construction (the stage's
        distillation), as for a control run of another model."""
        cfg = self.cfg.train.model_copy(update={"epochs": epochs, "lr": self.cfg.train.lr * lr_scale,
                                                "warmup_epochs": min(self.cfg.train.warmup_epochs, epochs)})
        key = key or f"phase{self.phase}"
        given = self.phase_hooks(self.model) if phase_hooks and self.phase_hooks else []
        hooks = [*given, *(extra_hooks or [])]
        if self.cfg.recalibrate_bn:
            hooks.append(RecalibrateBatchNorm(self.ctx, self.cfg.recalibrate_bn))
        trainer = self.ctx.trainer(model or self.model, cfg, hooks=hooks,
                                   lr_fn=lr_fn, masks=self.all_masks() if masks is None else masks,
                                   key=key, step_offset=self.logged_epochs)
        history = trainer.fit()
        self.logged_epochs += epochs
        self.phase += 1
        return history[-1] if history else {}

    def log_phase(self, index: int, last: dict[str, float], stats: dict, **extra: float) -> None:
        """Log round ``index``'s sparsity, statistics and accuracy, and print them in a line."""
        metrics = {"round_sparsity": overall_sparsity(self.masks) if self.masks else 0.0,
                   "round_nonzero": sum(int(m.sum()) for m in self.masks.values()),
                   **{f"round_{k}": v for k, v in stats.items()}, **extra}
        if "val_top1" in last:
            metrics.update(round_top1=last["val_top1"], round_loss=last["val_loss"])
        self.ctx.log_metrics(metrics, index)
        line = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"[{self.ctx.name}] round {index}: {line}", flush=True)

    def retrain_fn(self, kind: str, stats: dict, epochs: int) -> LrFn:
        """The LR schedule of a retraining phase after a prune step (``stats`` from prune_to;
        ALLR's initial LR is added to them)."""
        eta = None
        if kind == "allr":
            eta = allr_eta_init(stats["d"], stats["phase_fraction"], self.original.eta_max,
                                epochs, self.original.cfg.epochs)
            stats["eta_init"] = eta
        if kind == "ft" and self.original.last_lr < 1e-3 * self.original.eta_max:
            # Renda et al.'s FT keeps the schedule's final LR; a schedule that decays to 0
            # makes that "retraining" a no-op, which users should know before reading results
            print(f"[{self.ctx.name}] note: retrain 'ft' runs at the schedule's final LR, "
                  f"{self.original.last_lr:.2g} (peak {self.original.eta_max:.2g}); set "
                  "train.min_lr or schedule: step for a non-vanishing fine-tuning LR", flush=True)
        return retrain_schedule(kind, self.original, rewind_step=self.rewind_step(), eta_init=eta)

    def finish(self) -> Artifact:
        """The artifact with every mask and the record of how it was pruned."""
        self.artifact.masks = self.all_masks()
        artifact_keys.set_pruning(self.artifact, {
            "method": self.cfg.method, "criterion": self.cfg.criterion, "scope": self.cfg.scope,
            "granularity": self.cfg.granularity, "target": self.cfg.target_sparsity(),
            "allocation": self.cfg.allocation.rule if self.cfg.allocation else None,
            "layer_sparsity": layer_sparsity(self.masks),
            "floor_bound": floor_bound(self.masks, self.targets)})
        return self.artifact
