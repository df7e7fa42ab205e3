"""``distill``: train the student (the incoming model, or a new smaller one) against a teacher."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from ..compress.distill.config import DistillConfig
from ..compress.distill.hook import agreement
from ..core import artifact_keys
from ..core.artifact import Artifact
from ..core.config import DataConfig, ModelConfig, TrainConfig
from ..core.errors import CompressPipeError, suggest
from ..core.measure import check_masks, evaluate
from ..core.models import build_from_spec, build_model, load_weights, model_spec, read_checkpoint
from .base import Stage
from .context import StageContext
from .registry import register_stage
from .spec import UNKNOWN_STUDENT, PipelineView
from .teacher import check_distill, distill_hook
from .train import TrainStage


class DistillStageConfig(DistillConfig):
    """The distillation settings (teacher, temperature, alpha, gamma, features, cache) plus the
    student and the training loop's settings."""

    student: ModelConfig | None = Field(
        None, description="A new (usually smaller) network that replaces the incoming model, "
        "e.g. {name: test_resnet}; default: the incoming model is the student.")
    train: TrainConfig = Field(default_factory=TrainConfig,
                               description="The training loop's settings for the student.")


@register_stage("distill")
class DistillStage(Stage):
    """Knowledge distillation: L = gamma*CE + alpha*T^2*KL(teacher||student) + feature MSE.

    The student is the incoming model (its pruning masks are kept) or, with ``student:``, a new
    network whose spec replaces the artifact's. The teacher is 'stage:NAME', a timm name (+
    teacher_checkpoint), an artifact directory, a checkpoint file or an MLflow URI. Logs
    train_kd / train_ce / train_feat_* per epoch, and teacher_top1, student_top1 and agreement
    (top-1 match with the teacher on the test split)."""

    Config = DistillStageConfig

    def check(self, model: nn.Module, view: PipelineView) -> list[tuple[str, str]]:
        cfg: DistillStageConfig = self.config  # type: ignore[assignment]
        problems: list[tuple[str, str]] = []
        if cfg.student is not None:
            model, problems = _check_student(cfg.student, view.data)
            if model is None:
                return problems
        problems += [(f"train.{path}", msg)
                     for path, msg in TrainStage(cfg.train, self.name).check(model, view)]
        return problems + check_distill(cfg, model, view)

    def releases_masks(self) -> bool:
        """A new student network drops the incoming model's masks with the model."""
        return self.config.student is not None

    def output_architecture(self, spec: dict[str, Any],
                            view: PipelineView) -> dict[str, Any] | None:
        """The ``student``'s spec where it replaces the network (None where the file does not
        tell which network, or it cannot be read), else the incoming ``spec``."""
        # a config that did not parse (checks) is a RawConfig, which may lack ``student``
        student = getattr(self.config, "student", None)
        if student is UNKNOWN_STUDENT:
            return None
        if isinstance(student, ModelConfig):
            try:
                return model_spec(student, view.data)
            except (OSError, CompressPipeError):
                return None
        return spec

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        cfg: DistillStageConfig = self.config  # type: ignore[assignment]
        if cfg.student is not None:
            artifact = _with_new_student(artifact, cfg.student, ctx)
        hook = distill_hook(cfg, ctx, artifact.model)
        try:
            ctx.trainer(artifact.model, cfg.train, hooks=[hook], masks=artifact.masks).fit()
        finally:
            hook.close()
        if artifact.masks:
            check_masks(artifact.model, artifact.masks, self.name)
        test = ctx.data.test_loader()
        teacher, teacher_top1s = hook.reference(test)  # measured once, when training started
        top1s: list[torch.Tensor] = []
        student = evaluate(artifact.model, test, ctx.device, top1s)
        metrics = {
            "teacher_top1": teacher["top1"], "teacher_loss": teacher["loss"],
            "student_top1": student["top1"], "student_loss": student["loss"],
            "agreement": agreement(torch.cat(top1s), teacher_top1s, test),
        }
        if hook.cache is not None:
            metrics["teacher_cache_images"] = len(hook.cache)
        ctx.log_metrics(metrics, None)
        artifact_keys.set_distill(artifact, {"stage": self.name, "teacher": cfg.teacher, **metrics})
        return artifact


def _with_new_student(artifact: Artifact, student: ModelConfig, ctx: StageContext) -> Artifact:
    """A fresh artifact holding the new student network; the old model's masks, quantization
    state and extras describe a network that is gone (``releases_masks`` tells the runner)."""
    torch.manual_seed(ctx.seed)  # the student's initialisation does not depend on earlier stages
    model, spec = build_model(student, ctx.view.data)
    return Artifact(model=model, spec=spec, meta={}, lineage=artifact.lineage)


def _check_student(student: ModelConfig, data: DataConfig) -> tuple[nn.Module | None,
                                                                    list[tuple[str, str]]]:
    """Build the ``student:`` network (for ``data``) without hub weights; (model or None,
    problems)."""
    if student.name is not None:
        import timm  # lazy: importing timm takes seconds

        if not timm.is_model(student.name):
            return None, [("student.name", f"unknown timm model {student.name!r}"
                           f"{suggest(student.name, timm.list_models())}")]
    expected = data.dataset_num_classes()
    given = student.kwargs.get("num_classes")
    if expected is not None and given is not None and given != expected:
        return None, [("student.kwargs.num_classes", f"the student has {given} classes but "
                       f"dataset {data.name!r} has {expected}")]
    if student.checkpoint is not None and not student.checkpoint.is_file():
        return None, [("student.checkpoint", f"file not found: {student.checkpoint}")]
    spec = model_spec(student, data)
    try:
        model = build_from_spec(spec)
    except CompressPipeError as exc:
        return None, [("student", str(exc))]
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as exc:
        return None, [("student.kwargs", f"cannot build the student with {spec['kwargs']}: "
                       f"{type(exc).__name__}: {exc}")]
    if student.checkpoint is not None:
        try:
            load_weights(model, read_checkpoint(student.checkpoint), str(student.checkpoint))
        except CompressPipeError as exc:
            return None, [("student.checkpoint", str(exc))]
    return model, []
