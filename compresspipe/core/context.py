"""What an algorithm gets from the run around it: who runs it (for messages), the data, the
device and seed, where epoch checkpoints go, how metrics are logged, and the one training loop
wired to all of these. Stages hand a ``StageContext`` (a subclass) to the algorithms they call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig
from .data import DataBundle
from .masks import MaskHook
from .training import LrFn, Trainer, TrainHook

LogMetrics = Callable[[dict[str, float], int | None], None]


@dataclass
class RunContext:
    name: str  # who runs (a stage's name): progress lines and error messages say it
    data: DataBundle
    device: torch.device
    seed: int
    work_dir: Path  # scratch space for epoch checkpoints; survives a crash
    fingerprint: str  # identifies config + input: a checkpoint from elsewhere is ignored
    log_metrics: LogMetrics

    def trainer(self, model: nn.Module, cfg: TrainConfig, hooks: Sequence[TrainHook] = (),
                lr_fn: LrFn | None = None, masks: dict[str, torch.Tensor] | None = None,
                key: str = "train", step_offset: int = 0) -> Trainer:
        """The pipeline's one training loop, wired to this context's device, seed and logging.

        ``masks`` (an artifact's pruning masks) are enforced after every step; ``key``
        separates the checkpoints of several training phases inside one stage, and
        ``step_offset`` shifts their logged epochs so the phases' curves follow each other.
        """
        # masks first: every later hook sees the weights as they will be kept
        hooks = [MaskHook(masks), *hooks] if masks else list(hooks)
        return Trainer(
            model, self.data, cfg, device=self.device, seed=self.seed, hooks=hooks, lr_fn=lr_fn,
            checkpoint_dir=self.work_dir / key, fingerprint=f"{self.fingerprint}:{key}",
            log=lambda metrics, step: self.log_metrics(metrics, step + step_offset),
            desc=self.name if key == "train" else f"{self.name}/{key}",
        )
