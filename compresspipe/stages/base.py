"""What every stage is: a pydantic config, ``check`` against the real model, one
``run(artifact, ctx) -> artifact`` method, and traits the runner reads instead of naming stage
types."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from ..core.artifact import Artifact
from .context import StageContext
from .spec import PipelineView


class StageConfig(BaseModel):
    """Base of stage configs: unknown keys are errors (llm-compressor's recipe rule)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Stage:
    """A pipeline step. Subclasses set ``Config`` and implement ``run``; register with
    ``@register_stage("name")``.

    Traits (class attributes and methods the runner and the checks read):

    * ``logs_weight_histograms``: the stage moves weights onto a grid (weight sharing, int8),
      so the runner logs their histograms before and after;
    * ``deploys_int8``: the model it deploys is an int8 ONNX file;
    * ``codes_incoming_deployable``: what it deploys is the incoming stage's deployable file,
      coded (a .cpz of an int8 file stays that int8 model);
    * ``releases_masks()``: the stage may drop the incoming pruning masks (a new network);
    * ``output_architecture(spec, view)``: the spec of the network the stage passes on, as far
      as its config tells before anything runs (default: the one it receives).
    """

    type_name: ClassVar[str] = ""
    Config: ClassVar[type[StageConfig]] = StageConfig
    logs_weight_histograms: ClassVar[bool] = False
    deploys_int8: ClassVar[bool] = False
    codes_incoming_deployable: ClassVar[bool] = False

    def __init__(self, config: StageConfig, name: str):
        self.config = config
        self.name = name
        # what check() found worth telling without being a problem (``validate`` prints it)
        self.notes: list[str] = []

    def check(self, model: nn.Module, view: PipelineView) -> list[tuple[str, str]]:
        """Checks against the real model before anything runs: (path in config, message).
        ``view.earlier`` lists the stages that run before this one."""
        return []

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        raise NotImplementedError

    def releases_masks(self) -> bool:
        """True where this stage may return an artifact without the incoming masks."""
        return False

    def output_architecture(self, spec: dict[str, Any],
                            view: PipelineView) -> dict[str, Any] | None:
        """The model spec this stage passes on, given the ``spec`` it receives (None: unknown
        before it runs)."""
        return spec
