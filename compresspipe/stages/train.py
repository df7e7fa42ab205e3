"""``train``: dense training or fine-tuning with the one training loop."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator
from torch import nn

from ..core.artifact import Artifact
from ..core.artifact_keys import buffer_name, set_rewind_point, set_training
from ..core.config import StrictModel, TrainConfig
from ..core.errors import CompressPipeError
from ..core.training import Trainer, TrainHook, frozen_parameters
from .base import Stage
from .context import StageContext
from .patterns import unmatched_pattern_problems
from .registry import register_stage
from .spec import PipelineView


class RewindPoint(StrictModel):
    """When to record the weights that weight rewinding (late rewinding, LTH) returns to."""

    step: int | None = Field(None, ge=0, description="Optimizer step (0 = initialisation).")
    epoch: float | None = Field(None, ge=0, description="Epoch, may be fractional.")

    @model_validator(mode="after")
    def _one(self) -> RewindPoint:
        if (self.step is None) == (self.epoch is None):
            raise ValueError("give exactly one of 'step' or 'epoch'")
        return self


class TrainStageConfig(TrainConfig):
    record_rewind: RewindPoint | None = Field(
        None, description="Keep the weights at this point in the artifact for weight rewinding."
    )


@register_stage("train")
class TrainStage(Stage):
    """Train the incoming model (pruning masks, if any, are kept)."""

    Config = TrainStageConfig

    def check(self, model: nn.Module, view: PipelineView) -> list[tuple[str, str]]:
        problems = unmatched_pattern_problems(model, self.config.freeze, "freeze")
        if self.config.freeze and len(frozen_parameters(model, self.config.freeze)) == len(
            list(model.parameters())
        ):
            problems.append(("freeze", "these patterns freeze every parameter; nothing would train"))
        return problems

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        point = self.config.record_rewind
        recorder = RewindRecorder(artifact.model, point) if point is not None else None
        hooks = [recorder] if recorder is not None else []
        train_cfg = TrainConfig(**self.config.model_dump(exclude={"record_rewind"}))
        trainer = ctx.trainer(artifact.model, train_cfg, hooks=hooks, masks=artifact.masks)
        trainer.fit()
        set_training(artifact, train_cfg.model_dump(mode="json"), trainer.steps_per_epoch)
        if recorder is not None:
            step = recorder.target_step(trainer.steps_per_epoch)
            if step > trainer.total_steps:
                raise CompressPipeError(f"stage {self.name!r}: record_rewind at step {step} is "
                                        f"after the end of training ({trainer.total_steps} steps)")
            set_rewind_point(artifact, recorder.recorded(), step, self.name)
        return artifact


class RewindRecorder(TrainHook):
    """Records the model's state at the rewind point (checkpointed with the run)."""

    def __init__(self, model: nn.Module, point: RewindPoint):
        self.point = point
        self.keys = list(model.state_dict())
        # buffers in a module: the loop's epoch checkpoints save and restore them, so a
        # resumed run still has the weights recorded before the interruption
        self.store = nn.Module()
        for key, value in model.state_dict().items():
            self.store.register_buffer(buffer_name(key), torch.zeros_like(value))
        self.store.register_buffer("_done", torch.zeros((), dtype=torch.bool))
        self._spe = 1

    def target_step(self, steps_per_epoch: int) -> int:
        """The optimizer step to record at, given the loop's steps per epoch."""
        if self.point.step is not None:
            return self.point.step
        return int(round(self.point.epoch * steps_per_epoch))

    def modules(self) -> dict[str, nn.Module]:
        return {"rewind_recorder": self.store}

    def on_train_start(self, trainer: Trainer) -> None:
        self._spe = trainer.steps_per_epoch
        if self.target_step(self._spe) == 0 and not bool(self.store._done):
            self._record(trainer.model)

    def after_step(self, model: nn.Module, step: int) -> None:
        if step == self.target_step(self._spe) and not bool(self.store._done):
            self._record(model)

    @torch.no_grad()
    def _record(self, model: nn.Module) -> None:
        for key, value in model.state_dict().items():
            getattr(self.store, buffer_name(key)).copy_(value)
        self.store._done.fill_(True)

    def recorded(self) -> dict[str, torch.Tensor]:
        """The recorded state, on the CPU."""
        return {k: getattr(self.store, buffer_name(k)).detach().cpu().clone() for k in self.keys}
