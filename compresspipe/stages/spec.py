"""One stage entry of a pipeline file as the stages and the checks see it: its name, type and
typed config, and the 'stage:NAME' references it makes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pydantic import BaseModel

from ..core.config import DataConfig, ModelConfig
from ..tracking.config import TrackingConfig

INPUT_STAGE = "input"  # the stage name of the starting model (the runner saves it first)


@dataclass
class StageSpec:
    """One validated stage entry: its unique name, type and typed config.

    While a file with errors is checked, a stage whose config did not parse has ``parsed``
    False and a ``RawConfig`` of what the file says; ``known_name`` is False where the file
    does not tell its name (an invalid name, or an item that is no stage)."""

    index: int
    name: str
    type: str
    config: BaseModel | RawConfig
    parsed: bool = True
    known_name: bool = True

    @property
    def path(self) -> str:
        return f"stages[{self.index}].{self.type}" if self.type else f"stages[{self.index}]"


class RawConfig(SimpleNamespace):
    """The keys of a stage config that failed to parse, as written (``student`` parsed on its
    own where it can be, else ``UNKNOWN_STUDENT``): enough for the checks that only read them."""


# a stage config that names a student network the checks cannot build or cannot read
UNKNOWN_STUDENT = object()


@dataclass
class UnparsedStage:
    """A stage item of a file with errors whose config failed to parse; it keeps the item's
    place, so that later stages' default names and the architecture each receives stay right."""

    name: str | None  # None: the file does not say (missing or invalid)
    type: str  # '' for an item that names no single stage type
    params: BaseModel | RawConfig  # the config, where only unknown keys or the name were wrong
    named: bool = True  # False: an explicit name that is invalid


@dataclass(frozen=True)
class PipelineView:
    """The pipeline as a stage sees it, in checks and at run time: where the network and the
    data come from, where runs are tracked, every stage's spec and where outputs are saved.

    ``index`` is the position of the stage being served; ``earlier`` the stages before it."""

    model: ModelConfig
    data: DataConfig
    tracking: TrackingConfig
    output_dir: Path
    stages: list[StageSpec] = field(default_factory=list)
    index: int = 0

    @property
    def earlier(self) -> list[StageSpec]:
        return self.stages[: self.index]

    def resolved_output_dir(self) -> Path:
        return self.output_dir


def stage_references(spec: StageSpec) -> list[tuple[str, str]]:
    """(path in the stage's config, NAME) of every 'stage:NAME' value the stage gives."""
    config = spec.config
    data = (config.model_dump(mode="json") if isinstance(config, BaseModel)
            else plain_data(vars(config)))
    return _stage_refs(data)


def _stage_refs(value: Any, path: str = "") -> list[tuple[str, str]]:
    if isinstance(value, str) and value.startswith("stage:"):
        return [(path, value.removeprefix("stage:"))]
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in _stage_refs(v, f"{path}.{k}" if path else k)]
    if isinstance(value, list):
        return [r for i, v in enumerate(value) for r in _stage_refs(v, f"{path}[{i}]")]
    return []


def plain_data(value: Any) -> Any:
    """Plain data for the loader: pydantic models (stage configs) become their dicts."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_data(v) for v in value]
    return value
