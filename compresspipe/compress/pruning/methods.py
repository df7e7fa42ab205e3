"""The pruning algorithms: each composes criteria, scopes and schedules around the one loop."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from ...core.errors import CompressPipeError
from ...core.training import TrainHook
from .criteria import CRITERIA, NEEDS_DATA, ScoreInput
from .schedules import (
    OriginalSchedule,
    allr_eta_init,
    cubic_sparsity,
    imp_sparsities,
    norm_removed,
    retrain_schedule,
)
from .scopes import Masks, compute_masks, overall_sparsity, select_targets

if TYPE_CHECKING:
    from ...core.artifact import Artifact
    from ...stages.context import StageContext
    from ...stages.prune import PruneConfig

REWIND_PREFIX = "rewind/"


def run_method(cfg: PruneConfig, artifact: Artifact, ctx: StageContext) -> Artifact:
    pruner = Pruner(cfg, artifact, ctx)
    getattr(pruner, cfg.method)()
    return pruner.finish()


class Pruner:
    """State shared by the methods: the model, its targets, the masks and the phase counter."""

    def __init__(self, cfg: PruneConfig, artifact: Artifact, ctx: StageContext):
        self.cfg, self.artifact, self.ctx = cfg, artifact, ctx
        self.model = artifact.model.to(ctx.device)
        self.targets = select_targets(self.model, cfg.include, cfg.exclude, cfg.first_layer,
                                      cfg.classifier, cfg.overrides, cfg.min_layer_keep)
        self.inherited: Masks = dict(artifact.masks)  # from earlier stages: always kept
        self.masks: Masks = {n: m for n, m in artifact.masks.items() if n in self.targets.names}
        self.original = self._original_schedule()
        self.phase = 0
        self.logged_epochs = 0

    # -- pieces -------------------------------------------------------------------------------

    def _original_schedule(self) -> OriginalSchedule:
        info = self.artifact.meta.get("training")
        if info:
            from ...core.config import TrainConfig

            return OriginalSchedule(TrainConfig(**info["config"]), info["steps_per_epoch"])
        # no recorded dense training: this stage's own settings define the schedule
        return OriginalSchedule(self.cfg.train, max(1, len(self.ctx.data.train_loader())))

    def scores(self, seed_offset: int = 0) -> dict[str, torch.Tensor]:
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
        return {**self.inherited, **self.masks}

    def prune_to(self, sparsity: float, scores: dict[str, torch.Tensor] | None = None) -> dict:
        """Recompute masks at ``sparsity``, zero the pruned weights; return phase statistics."""
        before = sum(int(m.sum()) for m in self.masks.values()) if self.masks else sum(
            dict(self.model.named_parameters())[n].numel() for n in self.targets.names)
        new = compute_masks(scores if scores is not None else self.scores(self.phase),
                            self.targets, sparsity, self.cfg.scope, self.cfg.granularity,
                            previous=self.masks)
        d = norm_removed(self.model, {**self.all_masks(), **new})
        self.masks = {n: m.cpu() for n, m in new.items()}
        self.apply_masks()
        after = sum(int(m.sum()) for m in self.masks.values())
        return {"d": d, "phase_fraction": (before - after) / max(before, 1)}

    @torch.no_grad()
    def apply_masks(self) -> None:
        params = dict(self.model.named_parameters())
        for name, mask in self.all_masks().items():
            params[name].mul_(mask.to(params[name].device, params[name].dtype))

    def rewind(self) -> None:
        """Weight rewinding: surviving weights (and BN statistics) back to the rewind point."""
        if self.cfg.rewind_to == "init":
            state = self.ctx.load_stage("input").model.state_dict()
        else:
            state = {k[len(REWIND_PREFIX):]: v for k, v in self.artifact.extras.items()
                     if k.startswith(REWIND_PREFIX)}
            if not state:
                raise CompressPipeError(
                    f"stage {self.ctx.spec.name!r}: the incoming artifact has no recorded rewind "
                    "point; add record_rewind to the train stage before it")
        own = self.model.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)
        self.apply_masks()

    def rewind_step(self) -> int:
        if self.cfg.rewind_to == "init":
            return 0
        return int(self.artifact.meta.get("rewind", {}).get("step", 0))

    def hooks(self) -> list[TrainHook]:
        if self.cfg.distill is None:
            return []
        from ..distill.distill import distill_hook

        return [distill_hook(self.cfg.distill, self.ctx, self.model)]

    def train(self, epochs: int, lr_fn=None, key: str | None = None, lr_scale: float = 1.0,
              extra_hooks: list[TrainHook] | None = None, masks: Masks | None = None,
              model: nn.Module | None = None, distill: bool = True) -> dict[str, float]:
        """One training phase through the pipeline's loop; returns its last epoch's metrics."""
        cfg = self.cfg.train.model_copy(update={"epochs": epochs, "lr": self.cfg.train.lr * lr_scale,
                                                "warmup_epochs": min(self.cfg.train.warmup_epochs, epochs)})
        key = key or f"phase{self.phase}"
        hooks = [*(self.hooks() if distill else []), *(extra_hooks or [])]
        trainer = self.ctx.trainer(model or self.model, cfg, hooks=hooks,
                                   lr_fn=lr_fn, masks=self.all_masks() if masks is None else masks,
                                   key=key, step_offset=self.logged_epochs)
        history = trainer.fit()
        self.logged_epochs += epochs
        self.phase += 1
        return history[-1] if history else {}

    def log_phase(self, index: int, last: dict[str, float], stats: dict, **extra: float) -> None:
        metrics = {"round_sparsity": overall_sparsity(self.masks) if self.masks else 0.0,
                   "round_nonzero": sum(int(m.sum()) for m in self.masks.values()),
                   **{f"round_{k}": v for k, v in stats.items()}, **extra}
        if "val_top1" in last:
            metrics.update(round_top1=last["val_top1"], round_loss=last["val_loss"])
        self.ctx.log_metrics(metrics, index)
        line = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        print(f"[{self.ctx.spec.name}] round {index}: {line}", flush=True)

    def retrain_fn(self, kind: str, stats: dict, epochs: int):
        eta = None
        if kind == "allr":
            eta = allr_eta_init(stats["d"], stats["phase_fraction"], self.original.eta_max,
                                epochs, self.original.cfg.epochs)
            stats["eta_init"] = eta
        if kind == "ft" and self.original.last_lr < 1e-3 * self.original.eta_max:
            # Renda et al.'s FT keeps the schedule's final LR; a schedule that decays to 0
            # makes that "retraining" a no-op, which users should know before reading results
            print(f"[{self.ctx.spec.name}] note: retrain 'ft' runs at the schedule's final LR, "
                  f"{self.original.last_lr:.2g} (peak {self.original.eta_max:.2g}); set "
                  "train.min_lr or schedule: step for a non-vanishing fine-tuning LR", flush=True)
        return retrain_schedule(kind, self.original, rewind_step=self.rewind_step(), eta_init=eta)

    def finish(self) -> Artifact:
        self.artifact.masks = self.all_masks()
        self.artifact.meta["pruning"] = {"method": self.cfg.method, "criterion": self.cfg.criterion,
                                         "scope": self.cfg.scope, "granularity": self.cfg.granularity,
                                         "target": self.cfg.target_sparsity()}
        return self.artifact

    # -- methods ------------------------------------------------------------------------------

    def oneshot(self) -> None:
        stats = self.prune_to(self.cfg.target_sparsity())
        kind = self.cfg.retrain_kind()
        if kind == "wr":
            self.rewind()
        last = self.train(self.cfg.train.epochs, self.retrain_fn(kind, stats, self.cfg.train.epochs))
        self.log_phase(1, last, stats)

    def imp(self) -> None:
        kind = self.cfg.retrain_kind()
        for r, s in enumerate(imp_sparsities(self.cfg.target_sparsity(), self.cfg.rounds), 1):
            stats = self.prune_to(s)
            if kind == "wr":
                self.rewind()
            last = self.train(self.cfg.train.epochs, self.retrain_fn(kind, stats, self.cfg.train.epochs))
            self.log_phase(r, last, stats)

    def lth(self) -> None:
        self.imp()
        if not self.cfg.control:
            return
        # the control that makes a ticket a ticket: the same mask from a fresh initialisation
        from ...core.models import build_from_spec

        torch.manual_seed(self.ctx.seed + 7919)
        fresh = build_from_spec(self.artifact.spec).to(self.ctx.device)
        masks = self.all_masks()
        with torch.no_grad():
            params = dict(fresh.named_parameters())
            for name, mask in masks.items():
                params[name].mul_(mask.to(params[name].device, params[name].dtype))
        lr_fn = retrain_schedule("wr", self.original, rewind_step=self.rewind_step())
        last = self.train(self.cfg.train.epochs, lr_fn, key="control", masks=masks, model=fresh,
                          distill=False)
        self.ctx.log_metrics({"control_top1": last.get("val_top1", math.nan),
                              "control_loss": last.get("val_loss", math.nan)}, None)
        print(f"[{self.ctx.spec.name}] random re-init control: top1 {last.get('val_top1', 0):.2f}%",
              flush=True)

    def bimp(self) -> None:
        budget = self.cfg.bimp
        assert budget is not None
        self.train(budget.dense_epochs, key="dense")
        # the dense phase just ran: it defines η_max and T_train for ALLR
        self.original = OriginalSchedule(self.cfg.train.model_copy(update={"epochs": budget.dense_epochs}),
                                         max(1, len(self.ctx.data.train_loader())))
        per_round = (budget.total_epochs - budget.dense_epochs) / self.cfg.rounds
        kind = self.cfg.retrain_kind()
        spent = 0
        for r, s in enumerate(imp_sparsities(self.cfg.target_sparsity(), self.cfg.rounds), 1):
            epochs = int(round(per_round * r)) - spent  # integer epochs that add up to T − T0
            spent += epochs
            stats = self.prune_to(s)
            last = self.train(epochs, self.retrain_fn(kind, stats, epochs))
            self.log_phase(r, last, stats)

    def gmp(self) -> None:
        epochs = self.cfg.train.epochs
        spe = max(1, len(self.ctx.data.train_loader()))
        g = self.cfg.gmp
        t0 = int(round(g.start_epoch * spe))
        end = int(round((g.end_epoch if g.end_epoch is not None else 0.75 * epochs) * spe))
        if end <= t0 or end > epochs * spe:
            raise CompressPipeError(f"stage {self.ctx.spec.name!r}: gmp end_epoch must lie after "
                                    f"start_epoch and within the {epochs} training epochs")
        n = max(1, (end - t0) // g.frequency)
        hook = GradualHook(self, g.initial_sparsity, self.cfg.target_sparsity(), t0, n, g.frequency)
        last = self.train(epochs, extra_hooks=[hook], masks=self.inherited)
        self.log_phase(1, last, {"final_step_sparsity": hook.current})

    def dsd(self) -> None:
        d = self.cfg.dsd
        stats = self.prune_to(self.cfg.target_sparsity())
        last = self.train(d.sparse_epochs, key="sparse")
        self.log_phase(1, last, stats)
        # re-dense: pruned weights come back at zero and train again at a tenth of the LR
        self.masks = {}
        last = self.train(d.redense_epochs, key="redense", lr_scale=d.lr_factor)
        self.log_phase(2, last, {})

    def at_init(self) -> None:
        s = self.cfg.target_sparsity()
        if self.cfg.criterion == "synflow" and self.cfg.granularity == "unstructured":
            rounds = self.cfg.synflow_rounds
            # exponential schedule: equal pruning ratios per round avoid layer collapse
            for r in range(1, rounds + 1):
                stats = self.prune_to(1 - (1 - s) ** (r / rounds))
        else:
            stats = self.prune_to(s)
        last = self.train(self.cfg.train.epochs, key="train")
        self.log_phase(1, last, stats)


class GradualHook(TrainHook):
    """Zhu & Gupta: masks follow the cubic curve every Δt steps, then stay frozen at s_f."""

    def __init__(self, pruner: Pruner, s_i: float, s_f: float, t0: int, n: int, dt: int):
        self.pruner, self.s_i, self.s_f, self.t0, self.n, self.dt = pruner, s_i, s_f, t0, n, dt
        params = dict(pruner.model.named_parameters())
        # mask state lives in buffers so epoch checkpoints carry it across a resume
        self.state = nn.Module()
        for name in pruner.targets.names:
            self.state.register_buffer(name.replace(".", "__"),
                                       torch.ones_like(params[name], dtype=torch.bool))
        self.current = 0.0

    def modules(self) -> dict[str, nn.Module]:
        return {"gmp_masks": self.state}

    def on_train_start(self, trainer) -> None:
        self._sync_from_state()
        self.pruner.apply_masks()

    def _sync_from_state(self) -> None:
        self.pruner.masks = {n: getattr(self.state, n.replace(".", "__")).clone().cpu()
                             for n in self.pruner.targets.names}
        self.current = overall_sparsity(self.pruner.masks)

    def after_step(self, model: nn.Module, step: int) -> None:
        t = step - self.t0
        if 0 <= t <= self.n * self.dt and t % self.dt == 0:
            target = cubic_sparsity(step, self.s_i, self.s_f, self.t0, self.n, self.dt)
            if target > self.current:
                scores = {n: p.detach().abs() for n, p in model.named_parameters()
                          if n in self.pruner.targets.names}
                self.pruner.prune_to(target, scores)
                for name, mask in self.pruner.masks.items():
                    getattr(self.state, name.replace(".", "__")).copy_(mask)
                self.current = target
        self.pruner.apply_masks()
