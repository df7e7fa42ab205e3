"""What every stage is: a pydantic config and one ``run(artifact, ctx) -> artifact`` method."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from torch import nn

    from ..core.artifact import Artifact
    from ..pipeline.schema import PipelineConfig
    from .context import StageContext


class StageConfig(BaseModel):
    """Base of stage configs: unknown keys are errors (llm-compressor's recipe rule)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Stage:
    """A pipeline step. Subclasses set ``Config`` and implement ``run``; register with
    ``@register_stage("name")``. Stage modules import torch lazily so the CLI starts fast."""

    type_name: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig

    def __init__(self, config: StageConfig, name: str):
        self.config = config
        self.name = name

    def check(self, model: nn.Module, pipeline: PipelineConfig) -> list[tuple[str, str]]:
        """Checks against the real model before anything runs: (path in config, message)."""
        return []

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        raise NotImplementedError
