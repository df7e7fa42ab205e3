"""The distillation config (Hinton et al. 2015), shared by the distill stage and the stages that
distil while they train (prune, cluster, qat)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    field_validator,
)

from ...core.config import StrictModel, UsablePath, usable_path


class FeatureDistill(StrictModel):
    """One student layer regressed onto one teacher layer through a learned 1x1 adapter."""

    student: str = Field(description="Student module name, e.g. 'layer3'.")
    teacher: str = Field(description="Teacher module name, e.g. 'layer3'.")
    weight: float = Field(1.0, ge=0, description="Weight of this layer's MSE term.")


class DistillConfig(StrictModel):
    """Knowledge distillation (Hinton et al. 2015), usable on its own or inside other stages:
    L = gamma * CE + alpha * T^2 * KL(teacher_T || student_T) + sum(feature MSE terms)."""

    teacher: str = Field(
        description="'stage:NAME' (an earlier stage's output), a timm model name, a checkpoint "
        "or artifact path, or an MLflow artifact URI (runs:/..., models:/...)."
    )

    @field_validator("teacher")
    @classmethod
    def _teacher_usable(cls, value: str) -> str:
        usable_path(Path(value))  # it may be looked up as a file
        return value
    teacher_checkpoint: UsablePath | None = Field(
        None, description="Weights for a timm-name teacher (.safetensors or a state dict)."
    )
    teacher_kwargs: dict[str, Any] = Field(default_factory=dict,
                                           description="Extra timm kwargs for a named teacher.")
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.9, ge=0, le=100, description="Weight of the soft-target KD term.")
    gamma: float = Field(0.1, ge=0, le=100, description="Weight of the hard-label CE term.")
    features: list[FeatureDistill] = Field(default_factory=list)
    cache_teacher_logits: bool = Field(
        False, description="Compute teacher logits once (only without augmentation)."
    )
