"""Which network each stage receives and passes on, before anything runs: the pipeline's model,
changed only where a stage declares it (``Stage.output_architecture``: a distill stage's new
student). The checks and ``stage:NAME`` teachers both ask here."""

from __future__ import annotations

from typing import Any

from ..core.errors import CompressPipeError
from ..core.models import model_spec
from .registry import get_stage
from .spec import INPUT_STAGE, UNKNOWN_STUDENT, PipelineView, StageSpec


def stage_architecture(view: PipelineView, name: str) -> dict[str, Any] | None:
    """The model spec stage ``name``'s output has, as far as the file tells ('input': the
    pipeline's model): each stage up to ``name`` passes on its ``output_architecture`` (None:
    unknown before it runs)."""
    spec: dict[str, Any] | None = model_spec(view.model, view.data)
    if name == INPUT_STAGE:  # the pipeline's model as it starts, saved before any stage
        return spec
    for stage in view.stages:
        spec = passed_on(stage, spec, view)
        if stage.name == name:
            break
    return spec


def passed_on(stage: StageSpec, incoming: dict[str, Any] | None,
              view: PipelineView) -> dict[str, Any] | None:
    """The spec of the network ``stage`` passes on (None: unknown), as its class declares."""
    if getattr(stage.config, "student", None) is UNKNOWN_STUDENT:
        return None  # an item the checks cannot read names a network: it may switch to it
    if not stage.type:
        return incoming
    try:
        cls = get_stage(stage.type)
    except CompressPipeError:  # reported where the item is parsed
        return incoming
    return cls(stage.config, stage.name).output_architecture(incoming, view)
