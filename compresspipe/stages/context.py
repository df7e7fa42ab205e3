"""What a stage gets besides the artifact: data, device, seed, its directories and its logger."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from ..core.artifact import Artifact
    from ..core.config import TrainConfig
    from ..core.data import DataBundle
    from ..core.training import LrFn, Trainer, TrainHook
    from ..pipeline.loader import Pipeline
    from .spec import StageSpec


@dataclass
class StageContext:
    pipeline: Pipeline
    spec: StageSpec
    data: DataBundle
    device: torch.device
    seed: int
    work_dir: Path  # per-stage scratch space for epoch checkpoints; survives a crash
    fingerprint: str  # identifies stage config + input: a checkpoint from elsewhere is ignored
    log_metrics: Callable[[dict[str, float], int | None], None]
    load_stage: Callable[[str], Artifact]  # output of an earlier stage by name
    notes: dict = field(default_factory=dict)
    # (ONNX file, input example) -> the MLflow model URI of this stage's run; None untracked
    log_model: Callable[[Path, np.ndarray], str | None] = lambda path, example: None

    @property
    def previous_stage(self) -> str:
        """The stage whose saved output this stage receives ('input' for the first stage)."""
        return self.pipeline.stages[self.spec.index - 1].name if self.spec.index else "input"

    def trainer(self, model: nn.Module, cfg: TrainConfig, hooks: Sequence[TrainHook] = (),
                lr_fn: LrFn | None = None, masks: dict[str, torch.Tensor] | None = None,
                key: str = "train", step_offset: int = 0) -> Trainer:
        """The pipeline's one training loop, wired to this stage's device, seed and logging.

        ``masks`` (an artifact's pruning masks) are enforced after every step; ``key``
        separates the checkpoints of several training phases inside one stage, and
        ``step_offset`` shifts their logged epochs so the phases' curves follow each other.
        """
        from ..core.masks import MaskHook
        from ..core.training import Trainer

        # masks first: every later hook sees the weights as they will be kept
        hooks = [MaskHook(masks), *hooks] if masks else list(hooks)
        return Trainer(
            model, self.data, cfg, device=self.device, seed=self.seed, hooks=hooks, lr_fn=lr_fn,
            checkpoint_dir=self.work_dir / key, fingerprint=f"{self.fingerprint}:{key}",
            log=lambda metrics, step: self.log_metrics(metrics, step + step_offset), desc=self.spec.name if key == "train" else f"{self.spec.name}/{key}",
        )
