"""``cluster``: Deep-Compression weight sharing (k-means codebooks) with centroid fine-tuning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from ..compress.distill.config import DistillConfig
from ..compress.quant.cluster import (
    CentroidHook,
    attach_deployable,
    cluster_model,
    layer_bits,
    store,
    unmatched_overrides,
    verify,
)
from ..core.artifact import Artifact
from ..core.config import TrainConfig
from ..core.measure import evaluate
from .base import Stage, StageConfig
from .context import StageContext
from .patterns import unmatched_pattern_problems
from .registry import register_stage
from .spec import PipelineView
from .teacher import check_distill, distill_hook


def _default_finetune() -> TrainConfig:
    return TrainConfig(epochs=2, lr=0.0005, schedule="cosine", weight_decay=0.0)


class ClusterConfig(StageConfig):
    """Bits per layer type, per-layer overrides, k-means and centroid fine-tuning settings."""

    conv_bits: int | None = Field(8, ge=1, le=16,
                                  description="Index bits of conv layers (null: leave them fp32).")
    linear_bits: int | None = Field(5, ge=1, le=16,
                                    description="Index bits of linear layers (null: leave fp32).")
    overrides: dict[str, int | None] = Field(
        default_factory=dict,
        description="Module or weight name pattern (fnmatch) -> bits, or null to skip the layer; "
        "the first matching pattern wins, e.g. {'conv1': 8, 'fc': 4}.")
    kmeans_iters: int = Field(30, ge=1, le=10_000, description="Maximum Lloyd iterations.")
    centroid_grad: Literal["sum", "mean"] = Field(
        "sum", description="Centroid gradient: the sum of its members' gradients (Deep "
        "Compression), or their mean (learning rates on the per-weight scale).")
    finetune: TrainConfig = Field(
        default_factory=_default_finetune,
        description="Centroid fine-tuning with the training loop (epochs: 0 skips it).")
    distill: DistillConfig | None = Field(
        None, description="Distil from a teacher during centroid fine-tuning (joint KD, e.g. "
        "teacher: stage:dense).")

    @model_validator(mode="before")
    @classmethod
    def _finetune_over_defaults(cls, data):
        # `finetune: {epochs: 3}` keeps the small centroid learning rate and no weight decay:
        # the generic training defaults (lr 0.05, decay 5e-4) wreck summed centroid gradients
        if isinstance(data, dict) and isinstance(data.get("finetune"), dict):
            defaults = _default_finetune().model_dump(exclude_unset=True)
            data = {**data, "finetune": {**defaults, **data["finetune"]}}
        return data

    @field_validator("overrides")
    @classmethod
    def _bits_in_range(cls, value: dict[str, int | None]) -> dict[str, int | None]:
        for pattern, bits in value.items():
            if bits is not None and not 1 <= bits <= 16:
                raise ValueError(f"{pattern!r}: bits must be between 1 and 16 (or null), "
                                 f"found {bits}")
        return value


@register_stage("cluster")
class ClusterStage(Stage):
    """Share weights through per-layer codebooks; pruned weights keep an exact-zero centroid.
    Accuracy is that of the model rebuilt from ``model.codebook.safetensors``."""

    Config = ClusterConfig
    logs_weight_histograms = True

    def check(self, model: nn.Module, view: PipelineView) -> list[tuple[str, str]]:
        cfg = self.config
        problems = [(f"overrides.{p}", f"pattern {p!r} matches no conv or linear layer of the "
                     "model") for p in unmatched_overrides(model, cfg.overrides)]
        problems += [(f"finetune.{path}", msg) for path, msg in
                     unmatched_pattern_problems(model, cfg.finetune.freeze, "freeze")]
        if not problems and not layer_bits(model, cfg.conv_bits, cfg.linear_bits, cfg.overrides):
            problems.append(("conv_bits", "no layer is left to cluster (conv_bits, linear_bits "
                             "and overrides exclude them all)"))
        return problems + check_distill(cfg.distill, model, view, "distill")

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        cfg = self.config
        model = artifact.model.to(ctx.device)
        bits = layer_bits(model, cfg.conv_bits, cfg.linear_bits, cfg.overrides)
        layers = cluster_model(model, bits, artifact.masks, cfg.kmeans_iters)
        # on the validation split: these numbers steer the centroid fine-tuning's settings
        val = ctx.data.val_loader(purpose=f"stage {ctx.spec.name!r} (accuracy before and after "
                                  "centroid fine-tuning)")
        metrics = {"cluster_val_top1_before_finetune": evaluate(model, val, ctx.device)["top1"]}
        if cfg.finetune.epochs > 0:
            hooks = [CentroidHook(layers, cfg.centroid_grad)]
            if cfg.distill is not None:
                hooks.append(distill_hook(cfg.distill, ctx, model))
            try:
                ctx.trainer(model, cfg.finetune, hooks=hooks, masks=artifact.masks,
                            key="finetune").fit()
            finally:
                for hook in hooks:
                    hook.close()
            metrics["cluster_val_top1_after_finetune"] = evaluate(model, val, ctx.device)["top1"]
        verify(model, layers, artifact.masks)
        info = store(artifact, layers)
        attach_deployable(artifact, layers)
        metrics.update(_size_metrics(model, info))
        ctx.log_metrics(metrics, None)
        print(f"[{ctx.spec.name}] {len(layers)} layers clustered, "
              f"{metrics['cluster_bits_per_weight']:.2f} index bits per clustered weight, "
              f"val top1 {metrics['cluster_val_top1_before_finetune']:.2f}%"
              + (f" -> {metrics['cluster_val_top1_after_finetune']:.2f}% after centroid "
                 "fine-tuning" if "cluster_val_top1_after_finetune" in metrics else ""),
              flush=True)
        return artifact


def _size_metrics(model: nn.Module, info: dict) -> dict[str, float]:
    """Bits per clustered weight, codebook sizes, and the fixed-length packed index size."""
    layers = info["layers"].values()
    weights = sum(_numel(d["shape"]) for d in layers)
    index_bits = sum(d["bits"] * _numel(d["shape"]) for d in layers)
    entries = sum(2 ** d["bits"] for d in layers)
    params = sum(p.numel() for p in model.parameters())
    return {
        "cluster_layers": float(len(info["layers"])),
        "cluster_bits_per_weight": index_bits / max(weights, 1),
        "cluster_clustered_fraction": weights / max(params, 1),
        "cluster_codebook_entries": float(entries),
        "cluster_codebook_bytes": 4.0 * entries,
        "cluster_used_centroids": float(sum(d["used_centroids"] for d in layers)),
        "cluster_packed_index_bytes": float((index_bits + 7) // 8),
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
