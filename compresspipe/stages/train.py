"""``train``: dense training or fine-tuning with the one training loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

from ..core.config import StrictModel, TrainConfig
from .base import Stage
from .registry import register_stage

if TYPE_CHECKING:
    from torch import nn

    from ..core.artifact import Artifact
    from .context import StageContext

REWIND_PREFIX = "rewind/"


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
        from ..core.training import frozen_parameters
        from .patterns import unmatched_pattern_problems

        problems = unmatched_pattern_problems(model, self.config.freeze, "freeze")
        if self.config.freeze and len(frozen_parameters(model, self.config.freeze)) == len(
            list(model.parameters())
        ):
            problems.append(("freeze", "these patterns freeze every parameter; nothing would train"))
        return problems

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        hooks = []
        if self.config.record_rewind is not None:
            recorder = RewindRecorder(artifact.model, self.config.record_rewind)
            hooks.append(recorder)
        train_cfg = TrainConfig(**self.config.model_dump(exclude={"record_rewind"}))
        trainer = ctx.trainer(artifact.model, train_cfg, hooks=hooks, masks=artifact.masks)
        trainer.fit()
        artifact.meta["training"] = {"config": train_cfg.model_dump(mode="json"),
                                     "steps_per_epoch": trainer.steps_per_epoch}
        if hooks:
            step = hooks[0].target_step(trainer.steps_per_epoch)
            if step > trainer.total_steps:
                from ..core.errors import CompressPipeError

                raise CompressPipeError(f"stage {self.name!r}: record_rewind at step {step} is "
                                        f"after the end of training ({trainer.total_steps} steps)")
            artifact.extras.update({REWIND_PREFIX + k: v for k, v in hooks[0].recorded().items()})
            artifact.meta["rewind"] = {"step": step, "stage": self.name}
        return artifact


def RewindRecorder(model, point: RewindPoint):  # noqa: N802 - a factory that hides torch imports
    """A TrainHook recording the model's state at the rewind point (checkpointed with the run)."""
    import torch
    from torch import nn

    from ..core.training import TrainHook

    class _Recorder(TrainHook):
        def __init__(self):
            # buffers in a module: the loop's epoch checkpoints save and restore them, so a
            # resumed run still has the weights recorded before the interruption
            self.store = nn.Module()
            for key, value in model.state_dict().items():
                self.store.register_buffer(key.replace(".", "__"), torch.zeros_like(value))
            self.store.register_buffer("_done", torch.zeros((), dtype=torch.bool))
            self._spe = 1

        def target_step(self, steps_per_epoch: int) -> int:
            if point.step is not None:
                return point.step
            return int(round(point.epoch * steps_per_epoch))

        def modules(self):
            return {"rewind_recorder": self.store}

        def on_train_start(self, trainer):
            self._spe = trainer.steps_per_epoch
            if self.target_step(self._spe) == 0 and not bool(self.store._done):
                self._record(trainer.model)

        def after_step(self, m, step):
            if step == self.target_step(self._spe) and not bool(self.store._done):
                self._record(m)

        @torch.no_grad()
        def _record(self, m):
            for key, value in m.state_dict().items():
                getattr(self.store, key.replace(".", "__")).copy_(value)
            self.store._done.fill_(True)

        def recorded(self) -> dict[str, torch.Tensor]:
            return {k: getattr(self.store, k.replace(".", "__")).detach().cpu().clone()
                    for k in model.state_dict()}

    return _Recorder()
