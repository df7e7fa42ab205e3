"""Teachers that need nothing of the pipeline: how a teacher string is read, and building a
timm-name teacher, a checkpoint-file teacher and an artifact-directory teacher.

A teacher is named by one string: ``stage:NAME`` (an earlier stage's output; ``stage:input``
is the pipeline's model as it starts), a timm model name with trained weights
(``teacher_checkpoint``, or ``teacher_kwargs: {pretrained: true}`` where the hub's head fits the
dataset), an artifact directory, a checkpoint file (weights for the pipeline's own
architecture), an MLflow artifact URI (``runs:/<id>/artifact``) or a registered model version
whose source is such an artifact (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``). Stage and
MLflow teachers are resolved above this layer (``compresspipe.stages.teacher``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from ...core.artifact import Artifact
from ...core.config import DataConfig, ModelConfig
from ...core.errors import CompressPipeError, suggest
from ...core.models import build_from_spec, load_weights, model_spec, read_checkpoint

if TYPE_CHECKING:
    from .config import DistillConfig

TeacherKind = Literal["stage", "uri", "path", "timm"]
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class TeacherError(CompressPipeError):
    """A teacher reference that cannot be resolved; ``key`` is the config field to blame."""

    def __init__(self, message: str, key: str = "teacher"):
        super().__init__(message)
        self.key = key


def teacher_kind(ref: str) -> TeacherKind:
    """How a teacher string is read: stage reference, MLflow URI, filesystem path or timm name."""
    if ref.startswith("stage:"):
        return "stage"
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", ref):  # runs:/, models:/, s3://, ...
        return "uri"
    if "/" in ref or os.sep in ref or Path(ref).suffix in CHECKPOINT_SUFFIXES:
        return "path"
    import timm  # lazy: importing timm takes seconds; most references are told apart without it

    return "path" if Path(ref).exists() and not timm.is_model(ref) else "timm"


def timm_teacher(cfg: DistillConfig, data: DataConfig, download: bool) -> nn.Module:
    """The timm model ``cfg.teacher`` for ``data``, with its trained weights (hub weights only
    where ``download``)."""
    import timm  # lazy: importing timm takes seconds

    if not timm.is_model(cfg.teacher):
        raise TeacherError(
            f"unknown timm model {cfg.teacher!r}{suggest(cfg.teacher, timm.list_models())} (a "
            "teacher is 'stage:NAME', a timm model name, an artifact directory, a checkpoint file "
            "or an MLflow URI such as runs:/<run_id>/artifact)")
    kwargs = dict(cfg.teacher_kwargs)
    pretrained = bool(kwargs.pop("pretrained", False))
    spec = model_spec(ModelConfig(name=cfg.teacher, kwargs=kwargs), data)
    try:
        model = build_from_spec(spec, pretrained=pretrained and download)
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as exc:
        raise TeacherError(f"cannot build timm model {cfg.teacher!r} with {spec['kwargs']}: "
                           f"{type(exc).__name__}: {exc}", "teacher_kwargs") from None
    if cfg.teacher_checkpoint is None:
        if (problem := untrained_teacher(cfg.teacher, pretrained, spec["kwargs"])) is not None:
            raise TeacherError(problem)
    else:
        if not cfg.teacher_checkpoint.is_file():
            raise TeacherError(f"file not found: {cfg.teacher_checkpoint}", "teacher_checkpoint")
        try:
            load_weights(model, read_checkpoint(cfg.teacher_checkpoint), str(cfg.teacher_checkpoint))
        except CompressPipeError as exc:
            raise TeacherError(str(exc), "teacher_checkpoint") from None
    return model


def untrained_teacher(name: str, pretrained: bool, kwargs: dict[str, Any]) -> str | None:
    """Why timm model ``name`` built with ``kwargs`` (no checkpoint) would teach from random
    weights, or None. Read from timm's pretrained config: nothing is downloaded."""
    from timm.models import get_pretrained_cfg  # lazy: importing timm takes seconds

    hint = ("give its trained weights as teacher_checkpoint, or name a trained model "
            "('stage:NAME', an artifact directory, a checkpoint file, runs:/<run_id>/artifact)")
    if not pretrained:
        return (f"teacher {name!r} would have random weights: {hint}, or set teacher_kwargs: "
                "{pretrained: true} for the hub's weights")
    try:
        hub = get_pretrained_cfg(name)
    except (RuntimeError, ValueError, KeyError):
        hub = None
    if hub is None or not hub.has_weights:
        return f"timm has no pretrained weights for {name!r}: {hint}"
    classes = kwargs.get("num_classes", hub.num_classes)
    if hub.num_classes and classes != hub.num_classes:
        return (f"the pretrained {name!r} predicts {hub.num_classes} classes and the data "
                f"{classes}: timm would replace its classifier by a random one; {hint} (e.g. "
                "fine-tune it on this dataset in a pipeline of its own)")
    return None


def path_teacher(path: Path, model_cfg: ModelConfig, data: DataConfig) -> nn.Module:
    """An artifact directory, or a checkpoint holding weights of the pipeline's architecture
    (``model_cfg`` for ``data``)."""
    if path.is_dir():
        return artifact_model(path, str(path))
    if not path.is_file():
        raise TeacherError(f"teacher not found: no file or directory {str(path)!r}")
    model = build_from_spec(model_spec(model_cfg, data))
    try:
        load_weights(model, read_checkpoint(path), str(path))
    except CompressPipeError as exc:
        raise TeacherError(f"{exc} (a checkpoint teacher holds weights for the pipeline's model; "
                           "for another architecture give its timm name as the teacher and this "
                           "file as teacher_checkpoint)") from None
    return model


def artifact_model(directory: Path, ref: str) -> nn.Module:
    """The model of the compresspipe artifact in ``directory`` (``ref``: the teacher as named)."""
    try:
        return Artifact.load(directory).model
    except CompressPipeError as exc:
        raise TeacherError(f"teacher {ref!r} is not a compresspipe artifact: {exc}") from None
