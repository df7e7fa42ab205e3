"""``ptq``: post-training int8 — static (calibrated) or dynamic — deployed as ONNX."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..compress.quant.config import Int8Options
from ..compress.quant.onnx_int8 import INT8_FILE, export_onnx, quantize_dynamic_onnx
from ..core.artifact import Artifact
from .base import Stage
from .context import StageContext
from .registry import register_stage
from .spec import PipelineView


class PTQConfig(Int8Options):
    """Post-training quantization settings."""

    mode: Literal["static", "dynamic"] = Field(
        "static", description="'static': int8 activations with scales calibrated on training "
        "batches (convs and linears); 'dynamic': int8 weights, activations quantized per batch "
        "at run time (linears only; for Linear-heavy models such as ViTs and MLPs).")
    calibration_batches: int = Field(8, ge=1, le=100_000,
                                     description="'static': training batches fed to the observers.")
    observer: Literal["histogram", "minmax"] = Field(
        "histogram", description="'static': how activation ranges are chosen "
        "(histogram: L2-optimal clipping; minmax: full range).")


@register_stage("ptq")
class PTQStage(Stage):
    """Quantize the incoming model to int8 without training; accuracy is the int8 file's."""

    Config = PTQConfig
    logs_weight_histograms = True
    deploys_int8 = True

    def check(self, model: nn.Module, view: PipelineView) -> list[tuple[str, str]]:
        if self.config.mode == "dynamic" and not any(isinstance(m, nn.Linear)
                                                     for m in model.modules()):
            return [("mode", "dynamic int8 quantizes Linear layers and this model has none; "
                     "use mode: static")]
        return []

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        # lazy: torchao takes seconds to import (and warns); only int8 stages load it
        from ..compress.quant.int8 import finish_int8
        from ..compress.quant.pt2e import calibrate, convert, example_batch, prepare_ptq
        from ..compress.quant.qdq import QDQScheme

        cfg = self.config
        example = example_batch(ctx.data.examples())
        path = ctx.work_dir / INT8_FILE
        model = artifact.model.cpu().eval()
        if cfg.mode == "static":
            scheme = QDQScheme(per_channel=cfg.per_channel,
                               symmetric_activations=cfg.symmetric_activations,
                               observer=cfg.observer)
            prepared = prepare_ptq(model, example, scheme)
            torch.manual_seed(ctx.seed)  # augmentation draws, if the training set has any
            seen = calibrate(prepared, ctx.data.train_loader(torch.Generator().manual_seed(ctx.seed)),
                             cfg.calibration_batches)
            export_onnx(convert(prepared), example, path, trim_taps=cfg.trim_padding_taps)
            info = {"method": "ptq-static", "format": "onnx-qdq", **scheme.describe(),
                    "observer": cfg.observer, "calibration_images": seen}
        else:
            fp32_path = export_onnx(model, example, ctx.work_dir / "model.fp32.onnx",
                                    trim_taps=cfg.trim_padding_taps)
            quantize_dynamic_onnx(fp32_path, path, cfg.per_channel)
            info = {"method": "ptq-dynamic", "format": "onnx-dynamic",
                    "per_channel": cfg.per_channel,
                    "activations": "uint8, scale chosen per batch at run time"}
        finish_int8(artifact, ctx, path, model, info, cfg.latency_repeats,
                    cfg.latency_threads, cfg.trim_padding_taps)
        return artifact
