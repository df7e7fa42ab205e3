"""What a stage gets besides the artifact: the run's context (data, device, seed, logging, the
training loop), the pipeline as the stages see it, its place in it, earlier stages' outputs and
the metrics the runner measured on the model it receives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.artifact import Artifact
from ..core.context import RunContext
from ..core.training import Trainer
from .spec import INPUT_STAGE, PipelineView, StageSpec


@dataclass
class StageContext(RunContext):
    spec: StageSpec = field(kw_only=True)
    view: PipelineView = field(kw_only=True)  # the pipeline's model, data, tracking and stages
    load_stage: Callable[[str], Artifact] = field(kw_only=True)  # an earlier stage's output
    # metrics the runner measured on the saved model this stage receives (its deployed form)
    incoming: dict[str, Any] = field(default_factory=dict, kw_only=True)
    # (ONNX file, input example) -> the MLflow model URI of this stage's run; None untracked.
    # The model logged this way is the stage's logged model (the runner links its metrics).
    log_model: Callable[[Path, np.ndarray], str | None] = field(
        default=lambda path, example: None, kw_only=True)
    # told when the stage builds a training loop: the runner then logs the training data as an
    # input of the stage's run
    on_train: Callable[[], None] = field(default=lambda: None, kw_only=True)

    def trainer(self, *args: Any, **kwargs: Any) -> Trainer:
        """``RunContext.trainer``; the stage's run records that it trained on the data."""
        self.on_train()
        return super().trainer(*args, **kwargs)

    @property
    def previous_stage(self) -> str:
        """The stage whose saved output this stage receives ('input' for the first stage)."""
        return self.view.stages[self.spec.index - 1].name if self.spec.index else INPUT_STAGE

    def stage_dir(self, name: str) -> Path:
        """Where stage ``name`` (or 'input') saved its artifact."""
        return self.view.resolved_output_dir() / name
