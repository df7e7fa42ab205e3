"""Teachers and distillation as the stages use them: resolving the teacher a ``DistillConfig``
names (``stage:NAME`` needs the pipeline; MLflow URIs need its tracking store), the
distillation hook for a stage's training, and the check of a distillation config against the
real student before anything runs.

``distill_hook(cfg, ctx, student)`` is what every stage that trains uses for (joint)
distillation (the distill stage, and prune, cluster and qat with a ``distill:`` block);
``check_distill(cfg, model, view, prefix)`` is what their ``check`` calls. Before anything ran, a
``stage:NAME`` teacher is the architecture ``stage_architecture(view, NAME)`` tells, without
weights: what each stage up to NAME declares it passes on (``Stage.output_architecture``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..compress.distill.config import DistillConfig
from ..compress.distill.hook import DistillHook, freeze
from ..compress.distill.losses import feature_mismatch, module_problem, probe
from ..compress.distill.teacher import (
    TeacherError,
    artifact_model,
    path_teacher,
    teacher_kind,
    timm_teacher,
)
from ..core.config import DataConfig
from ..core.errors import CompressPipeError
from ..core.models import build_from_spec
from ..tracking.download import download_teacher
from ..tracking.pyfunc import MLMODEL_FILE, load_mlflow_model
from .architecture import stage_architecture
from .context import StageContext
from .spec import PipelineView


def distill_hook(cfg: DistillConfig, ctx: StageContext, student: nn.Module) -> DistillHook:
    """The distillation hook for ``student``, with the teacher ``cfg`` names resolved in ``ctx``.

    Pass it to ``ctx.trainer(..., hooks=[hook], masks=artifact.masks)``; call ``hook.close()``
    if the student is used after a training that did not run to its last epoch."""
    teacher = resolve_teacher(cfg, ctx).to(ctx.device)
    shape = (ctx.data.in_chans, ctx.data.image_size, ctx.data.image_size)
    return DistillHook(teacher, cfg, student, shape)


def resolve_teacher(cfg: DistillConfig, ctx: StageContext) -> nn.Module:
    """The teacher network ``cfg.teacher`` names, with its weights, frozen in eval mode."""
    return freeze(load_teacher(cfg, ctx.view, ctx.load_stage))


def load_teacher(cfg: DistillConfig, view: PipelineView,
                 load_stage: Callable[[str], Any] | None = None) -> nn.Module:
    """Build the teacher. Without ``load_stage`` (validation, before anything ran), a stage
    teacher is its architecture without weights and hub weights are not downloaded.

    ``view`` is read for its ``model``, ``data``, ``tracking`` and ``resolved_output_dir()``
    (and ``stages`` for a stage teacher without ``load_stage``)."""
    kind = teacher_kind(cfg.teacher)
    if kind != "timm":
        for key in ("teacher_checkpoint", "teacher_kwargs"):
            if getattr(cfg, key):
                raise TeacherError(f"{key} applies to a timm-name teacher, not to {cfg.teacher!r}",
                                   key)
    if kind == "stage":
        name = cfg.teacher.removeprefix("stage:")
        if load_stage is not None:
            # the stage's fp32 weights, even where the stage also wrote a deployable form
            return load_stage(name).model
        spec = stage_architecture(view, name)
        if spec is None:  # the checks stop before a stage that could ask for it
            raise TeacherError(f"the network stage {name!r} passes on is unknown before it runs")
        return build_from_spec(spec)
    if kind == "timm":
        return timm_teacher(cfg, view.data, download=load_stage is not None)
    if kind == "uri":
        path = download_teacher(cfg.teacher, view.tracking, view.resolved_output_dir())
        if (path / MLMODEL_FILE).is_file():  # a logged (or registered) stage model
            try:
                return load_mlflow_model(path)
            except CompressPipeError as exc:
                raise TeacherError(f"teacher {cfg.teacher!r}: {exc}") from None
        return artifact_model(path, cfg.teacher)
    return path_teacher(Path(cfg.teacher), view.model, view.data)


def check_distill(cfg: DistillConfig | None, student_model: nn.Module, view: PipelineView,
                  prefix: str = "") -> list[tuple[str, str]]:
    """Problems of a distillation config against the real student, as (path, message) pairs
    with paths under ``prefix`` (e.g. 'distill' inside a prune stage's config); none for an
    absent (None) config, so stages with an optional ``distill:`` block just call this."""
    if cfg is None:
        return []

    def at(key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    problems: list[tuple[str, str]] = []
    if cfg.cache_teacher_logits and view.data.augment:
        problems.append((at("cache_teacher_logits"), "cached teacher logits are only valid "
                         "without augmentation (data.augment is true): an augmented image "
                         "differs every epoch"))
    if cfg.cache_teacher_logits and cfg.features:
        problems.append((at("cache_teacher_logits"), "cannot cache with feature distillation: "
                         "the teacher's features are needed at every step"))
    try:
        teacher = freeze(load_teacher(cfg, view))
    except TeacherError as exc:
        return [*problems, (at(exc.key), str(exc))]

    seen: set[str] = set()
    for i, pair in enumerate(cfg.features):
        for model, name, who in ((student_model, pair.student, "student"),
                                 (teacher, pair.teacher, "teacher")):
            if (problem := module_problem(model, name, who)) is not None:
                problems.append((at(f"features[{i}].{who}"), problem))
        if pair.student in seen:
            problems.append((at(f"features[{i}].student"),
                             f"student layer {pair.student!r} is listed twice"))
        seen.add(pair.student)
    if problems:
        return problems
    return _shape_problems(cfg, student_model, teacher, view.data, at)


def _shape_problems(cfg: DistillConfig, student: nn.Module, teacher: nn.Module, data: DataConfig,
                    at: Callable[[str], str]) -> list[tuple[str, str]]:
    """Teacher and student must take the data's input and predict the same classes; feature
    pairs must be adaptable."""
    shape = (data.dataset_channels(), data.image_size, data.image_size)
    where = f"{shape[0]}x{shape[1]}x{shape[2]} images"
    try:
        t_out, t_shapes = probe(teacher, shape, [p.teacher for p in cfg.features])
    except Exception as exc:  # any failure of a foreign forward pass means it does not fit
        return [(at("teacher"), f"teacher {cfg.teacher!r} cannot run on the data's {where}: "
                 f"{type(exc).__name__}: {_first_line(exc)}")]
    was_training = student.training
    student.eval()
    try:
        s_out, s_shapes = probe(student, shape, [p.student for p in cfg.features])
    except Exception as exc:
        return [(at("teacher"), f"the student cannot run on the data's {where} "
                 f"({type(exc).__name__}: {_first_line(exc)})")]
    finally:
        student.train(was_training)
    if t_out.dim() != 2 or t_out.shape[1:] != s_out.shape[1:]:
        return [(at("teacher"), f"teacher {cfg.teacher!r} outputs {_classes(t_out)}, the student "
                 f"{_classes(s_out)}; set the teacher's num_classes or pick a teacher trained on "
                 "this dataset")]
    problems = []
    for i, pair in enumerate(cfg.features):
        if (problem := feature_mismatch(s_shapes[pair.student], t_shapes[pair.teacher])):
            problems.append((at(f"features[{i}]"), problem))
    return problems


def _classes(logits: torch.Tensor) -> str:
    if logits.dim() == 2:
        return f"{logits.shape[1]} classes"
    return f"a tensor of shape {list(logits.shape[1:])} per image"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
