"""``qat``: quantization-aware fine-tuning, then a real int8 model for CPU (ONNX, onnxruntime)."""

from __future__ import annotations

from pydantic import Field, model_validator
from torch import nn

from ..compress.distill.config import DistillConfig
from ..compress.quant.config import Int8Options
from ..compress.quant.onnx_int8 import INT8_FILE, export_onnx
from ..core.artifact import Artifact
from ..core.config import TrainConfig
from ..formats.export import refuse_random_nodes
from .base import Stage
from .context import StageContext
from .patterns import unmatched_pattern_problems
from .registry import register_stage
from .sensitivity import keep_float_layers, mixed_precision_record
from .spec import PipelineView
from .teacher import check_distill, distill_hook


class QATConfig(TrainConfig, Int8Options):
    """The training loop's settings (short and gentle by default) plus the int8 scheme."""

    epochs: int = Field(3, ge=1, le=100_000)
    lr: float = Field(0.005, gt=0, le=100)
    freeze_bn_after: int | None = Field(
        None, ge=0, description="Epochs after which batch-norm statistics stop updating "
        "(0: from the start; default: never).")
    freeze_observers_after: int | None = Field(
        None, ge=1, description="Epochs after which scales and zero points are fixed "
        "(default: never).")
    distill: DistillConfig | None = Field(
        None, description="Learn from a teacher while fine-tuning (logit distillation).")

    @model_validator(mode="after")
    def _freezes_fit(self) -> QATConfig:
        for key in ("freeze_bn_after", "freeze_observers_after"):
            value = getattr(self, key)
            if value is not None and value >= self.epochs:
                raise ValueError(f"{key} ({value}) must be below epochs ({self.epochs}), "
                                 "or it never takes effect")
        return self


@register_stage("qat")
class QATStage(Stage):
    """Fake-quant fine-tuning (torchao PT2E, conv-BN folding simulated) through the one training
    loop, converted to int8 and exported as ``model.int8.onnx``; accuracy is the int8 file's."""

    Config = QATConfig
    logs_weight_histograms = True
    deploys_int8 = True

    def check(self, model: nn.Module, view: PipelineView) -> list[tuple[str, str]]:
        cfg = self.config
        problems = unmatched_pattern_problems(model, cfg.freeze, "freeze")
        if cfg.distill is not None and cfg.distill.features:
            problems.append(("distill.features", "feature distillation needs module hooks, which "
                             "the captured QAT graph does not have; use logit distillation here"))
            return problems

        return problems + check_distill(cfg.distill, model, view, "distill")

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        # lazy: torchao takes seconds to import (and warns); only int8 stages load it
        from ..compress.quant.int8 import finish_int8
        from ..compress.quant.pt2e import (
            QATScheduleHook,
            convert,
            copy_trained_weights,
            enable_train_eval,
            example_batch,
            nudge_zero_bn_scales,
            prepare_qat,
            stochastic_depth_modules,
        )
        from ..compress.quant.qdq import QDQScheme

        cfg = self.config
        drops, floating = (keep_float_layers(cfg.keep_float, artifact.model, ctx)
                           if cfg.keep_float else ({}, []))
        scheme = QDQScheme(per_channel=cfg.per_channel,
                           symmetric_activations=cfg.symmetric_activations, qat=True,
                           float_weights=frozenset(floating))
        nudged = nudge_zero_bn_scales(artifact.model, artifact.masks)
        example = example_batch(ctx.data.examples())
        prepared = prepare_qat(artifact.model, example, scheme)
        modes = enable_train_eval(prepared)
        hooks = [QATScheduleHook(prepared, modes, cfg.freeze_bn_after, cfg.freeze_observers_after)]
        if cfg.distill is not None:
            hooks.append(distill_hook(cfg.distill, ctx, prepared))
        ctx.trainer(prepared, cfg, hooks=hooks, masks=artifact.masks).fit()

        copy_trained_weights(prepared, artifact.model)
        path = export_onnx(convert(prepared), example, ctx.work_dir / INT8_FILE,
                           trim_taps=cfg.trim_padding_taps)
        refuse_random_nodes(path, f"stage {self.name!r}")
        info = {"method": "qat", "format": "onnx-qdq", **scheme.describe(),
                # a captured graph cannot switch these off for inference: QAT trains without
                "stochastic_depth_off": stochastic_depth_modules(artifact.model),
                "bn_scales_nudged": nudged,
                **mixed_precision_record(cfg.keep_float, drops, floating)}
        finish_int8(artifact, ctx, path, artifact.model, info, cfg.latency_repeats,
                    cfg.latency_threads, cfg.trim_padding_taps)
        return artifact
