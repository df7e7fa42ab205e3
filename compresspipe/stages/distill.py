"""``distill``: train the student (the incoming model, or a new smaller one) against a teacher."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from ..compress.distill.config import DistillConfig
from ..core.config import ModelConfig, TrainConfig
from .base import Stage
from .registry import register_stage

if TYPE_CHECKING:
    from torch import nn

    from ..core.artifact import Artifact
    from ..pipeline.schema import PipelineConfig
    from .context import StageContext


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
        from ..compress.distill.distill import check_distill
        from .train import TrainStage

        cfg: DistillStageConfig = self.config  # type: ignore[assignment]
        problems: list[tuple[str, str]] = []
        if cfg.student is not None:
            model, problems = _check_student(cfg.student, pipeline)
            if model is None:
                return problems
        problems += [(f"train.{path}", msg)
                     for path, msg in TrainStage(cfg.train, self.name).check(model, pipeline)]
        return problems + check_distill(cfg, model, pipeline)

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        import torch

        from ..compress.distill.distill import agreement, distill_hook
        from ..core.measure import check_masks, evaluate

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
        artifact.meta["distill"] = {"stage": self.name, "teacher": cfg.teacher, **metrics}
        return artifact


def _with_new_student(artifact: Artifact, student: ModelConfig, ctx: StageContext) -> Artifact:
    """A fresh artifact holding the new student network; the old model's masks, quantization
    state and extras describe a network that is gone."""
    import torch

    from ..core.artifact import Artifact
    from ..core.models import build_model

    torch.manual_seed(ctx.seed)  # the student's initialisation does not depend on earlier stages
    model, spec = build_model(student, ctx.pipeline.config.data)
    meta = {"masks_released": True} if artifact.masks else {}
    return Artifact(model=model, spec=spec, meta=meta, lineage=artifact.lineage)


def _check_student(student: ModelConfig, pipeline: PipelineConfig) -> tuple[nn.Module | None,
                                                                           list[tuple[str, str]]]:
    """Build the ``student:`` network without hub weights; (model or None, problems)."""
    from ..core.errors import CompressPipeError, suggest
    from ..core.models import build_from_spec, load_weights, model_spec, read_checkpoint

    if student.name is not None:
        import timm

        if not timm.is_model(student.name):
            return None, [("student.name", f"unknown timm model {student.name!r}"
                           f"{suggest(student.name, timm.list_models())}")]
    expected = pipeline.data.dataset_num_classes()
    given = student.kwargs.get("num_classes")
    if expected is not None and given is not None and given != expected:
        return None, [("student.kwargs.num_classes", f"the student has {given} classes but "
                       f"dataset {pipeline.data.name!r} has {expected}")]
    if student.checkpoint is not None and not student.checkpoint.is_file():
        return None, [("student.checkpoint", f"file not found: {student.checkpoint}")]
    spec = model_spec(student, pipeline.data)
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
