"""``train``: dense training or fine-tuning with the one training loop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import TrainConfig
from ..registry import register_stage
from .base import Stage

if TYPE_CHECKING:
    from torch import nn

    from ..artifact import Artifact
    from ..config import PipelineConfig
    from ..context import StageContext


@register_stage("train")
class TrainStage(Stage):
    """Train the incoming model (pruning masks, if any, are kept)."""

    Config = TrainConfig

    def check(self, model: nn.Module, pipeline: PipelineConfig) -> list[tuple[str, str]]:
        from ..training import frozen_parameters
        from ..validation import unmatched_pattern_problems

        problems = unmatched_pattern_problems(model, self.config.freeze, "freeze")
        if self.config.freeze and len(frozen_parameters(model, self.config.freeze)) == len(
            list(model.parameters())
        ):
            problems.append(("freeze", "these patterns freeze every parameter; nothing would train"))
        return problems

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        ctx.trainer(artifact.model, self.config, masks=artifact.masks).fit()
        return artifact
