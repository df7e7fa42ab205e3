"""The pipeline file's top-level schema (pydantic, unknown keys forbidden), typed per registered
stage type at load time."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    create_model,
    field_validator,
)

from ..core.config import DataConfig, ModelConfig, StrictModel, UsablePath
from ..stages.registry import get_stage, list_stages
from ..stages.spec import PipelineView, StageSpec
from ..tracking.config import TrackingConfig
from .cache_config import CacheConfig
from .search_config import SearchConfig
from .yaml_source import SourceMap

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class PipelineConfig(StrictModel):
    """A whole pipeline file. ``stages`` is typed per registered stage at load time."""

    name: str = Field(pattern=NAME_PATTERN, description="Pipeline name (also the default run name).")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    output_dir: UsablePath | None = Field(None, description="Default: runs/<name>.")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    search: SearchConfig | None = Field(None, description="Search parameters of the stages "
                                        "(a run of this file runs the search).")
    stages: list[Any] = Field(min_length=1)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError("expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
        return v

    def resolved_output_dir(self) -> Path:
        return (self.output_dir or Path("runs") / self.name).resolve()


# ---------------------------------------------------------------------------------------------
# Schema assembly


def stage_item_model(type_name: str) -> type[BaseModel]:
    """``{name: ..., <type>: {...}}`` as a pydantic model for one stage type."""
    cls = get_stage(type_name)
    return create_model(
        f"{cls.__name__}Item",
        __config__=ConfigDict(extra="forbid", populate_by_name=False),
        name=(str | None, Field(None, pattern=NAME_PATTERN)),
        params=(cls.Config, Field(default_factory=cls.Config, alias=type_name)),
    )


def _stage_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        keys = [k for k in value if k != "name"]
        return keys[0] if len(keys) == 1 else None
    return None


def pipeline_model(stage_types: list[str] | None = None) -> type[PipelineConfig]:
    """PipelineConfig whose ``stages`` accepts exactly the given (default: all built-in) types."""
    types = sorted(set(stage_types or list_stages()))
    items = [Annotated[stage_item_model(t), Tag(t)] for t in types]
    item_type: Any = Annotated[Union[tuple(items)], Discriminator(_stage_tag)]  # noqa: UP007
    if len(items) == 1:
        item_type = stage_item_model(types[0])
    return create_model(
        "Pipeline",
        __base__=PipelineConfig,
        stages=(list[item_type], Field(min_length=1, description="Ordered stages.")),
    )


def json_schema() -> dict[str, Any]:
    """JSON Schema of the pipeline format, for editors."""
    schema = pipeline_model().model_json_schema()
    schema["title"] = "compresspipe pipeline"
    return schema


@dataclass
class PipelineFile:
    """A validated pipeline file: its config, the typed spec of each stage, what the file said
    (``raw``) and where each key stands in it (``source_map``). ``loader.Pipeline`` adds the
    verbs (load, validate, run); the runner needs only this."""

    config: PipelineConfig
    stages: list[StageSpec]
    file: str
    raw: dict[str, Any]
    source_map: SourceMap
    notes: list[str] = field(default_factory=list)  # what the model checks told (validate)

    @property
    def output_dir(self) -> Path:
        return self.config.resolved_output_dir()

    def view(self, index: int = 0) -> PipelineView:
        """The pipeline as the stage at ``index`` sees it."""
        return view_of(self.config, self.stages, index)

    def __repr__(self) -> str:
        stages = ", ".join(f"{s.name} ({s.type})" for s in self.stages)
        return f"Pipeline({self.config.name!r}, file={self.file!r}, stages=[{stages}])"

    def resolved_yaml(self) -> str:
        """The pipeline with overrides applied and every default filled in."""
        data = self.config.model_dump(mode="json", exclude={"stages"})
        data["stages"] = [
            {"name": s.name, s.type: s.config.model_dump(mode="json")} for s in self.stages
        ]
        return yaml.safe_dump(data, sort_keys=False)


def view_of(config: PipelineConfig, stages: list[StageSpec], index: int = 0) -> PipelineView:
    """What the stages see of ``config``: its model, data, tracking, stages and output place."""
    return PipelineView(config.model, config.data, config.tracking, config.resolved_output_dir(),
                        stages, index)
