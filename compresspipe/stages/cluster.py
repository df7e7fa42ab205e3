"""``cluster``: Deep-Compression weight sharing (k-means codebooks) with centroid fine-tuning,
or uniform quantization with a trained step (``codebook: uniform``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from torch import nn

from ..compress.distill.config import DistillConfig
from ..compress.quant.cluster import (
    CentroidHook,
    Quantizer,
    attach_deployable,
    bits_under_budget,
    cluster_model,
    cluster_weight,
    clustered_bytes,
    layer_bits,
    store,
    unmatched_overrides,
    verify,
)
from ..compress.quant.uniform import uniform_weight
from ..compress.sensitivity import bits_curves
from ..core.artifact import Artifact
from ..core.config import StrictModel, TrainConfig
from ..core.errors import CompressPipeError
from ..core.measure import evaluate
from .base import Stage, StageConfig
from .context import StageContext
from .patterns import unmatched_pattern_problems
from .registry import register_stage
from .sensitivity import check_scan, resolve_scan
from .spec import PipelineView
from .teacher import check_distill, distill_hook

# codebook -> how one weight tensor gets its codebook and indices
QUANTIZERS: dict[str, Quantizer] = {"kmeans": cluster_weight, "uniform": uniform_weight}


def _default_finetune() -> TrainConfig:
    return TrainConfig(epochs=2, lr=0.0005, schedule="cosine", weight_decay=0.0)


class BitsAllocation(StrictModel):
    """Bits per layer under a bytes budget, in place of conv_bits/linear_bits for the layers
    they select."""

    budget_bytes: int = Field(gt=0, description="Bytes of the clustered layers: the indices "
                              "of the weights they store (a pruned layer's survivors) packed at "
                              "fixed length, plus fp32 codebooks.")
    rule: Literal["uniform", "sensitivity"] = Field(
        "sensitivity", description="uniform: the most bits every layer can share; sensitivity: "
        "greedy from the most bits, lowering the layer with the least validation-loss increase "
        "per byte saved (from a sensitivity stage's bits scan).")
    scan: str | None = Field(None, description="sensitivity: 'stage:NAME' of the sensitivity "
                             "stage (default: the scan the incoming model carries).")
    choices: list[int] | None = Field(None, description="Bits a layer may get (default: the "
                                      "scan's bits grid; 1..8 for uniform).")

    @field_validator("choices")
    @classmethod
    def _choices_range(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(not 1 <= b <= 16 for b in v)):
            raise ValueError(f"choices must be bits in 1..16, found {v}")
        return v

    @model_validator(mode="after")
    def _scan_needs_rule(self) -> BitsAllocation:
        if self.scan is not None and self.rule != "sensitivity":
            raise ValueError("scan applies to rule 'sensitivity'")
        return self


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
    codebook: Literal["kmeans", "uniform"] = Field(
        "kmeans", description="kmeans: 2**bits shared values per layer from 1-D k-means, the "
        "centroids fine-tuned (Deep Compression); uniform: the grid step * j (|j| < 2**(bits-1), "
        "one spare code), the step fitted for the least squared error and then trained (NNCodec's "
        "scalar quantization, with exact zeros for pruned weights); needs bits >= 2.")
    kmeans_iters: int = Field(30, ge=1, le=10_000, description="Maximum Lloyd iterations "
                              "(uniform: least-squares refinements of the step).")
    centroid_grad: Literal["sum", "mean"] = Field(
        "sum", description="Centroid gradient: the sum of its members' gradients (Deep "
        "Compression), or their mean (learning rates on the per-weight scale). uniform: the "
        "step's gradient scaled as LSQ does (sum), or the least-squares projection of the "
        "weights' own gradients (mean).")
    finetune: TrainConfig = Field(
        default_factory=_default_finetune,
        description="Centroid fine-tuning with the training loop (epochs: 0 skips it).")
    distill: DistillConfig | None = Field(
        None, description="Distil from a teacher during centroid fine-tuning (joint KD, e.g. "
        "teacher: stage:dense).")
    allocation: BitsAllocation | None = Field(
        None, description="Bits per layer under a bytes budget (uniform or by sensitivity) for "
        "the layers conv_bits, linear_bits and overrides select.")

    @model_validator(mode="before")
    @classmethod
    def _finetune_over_defaults(cls, data):
        # `finetune: {epochs: 3}` keeps the small centroid learning rate and no weight decay:
        # the generic training defaults (lr 0.05, decay 5e-4) wreck summed centroid gradients
        if isinstance(data, dict) and isinstance(data.get("finetune"), dict):
            defaults = _default_finetune().model_dump(exclude_unset=True)
            data = {**data, "finetune": {**defaults, **data["finetune"]}}
        return data

    @model_validator(mode="after")
    def _uniform_needs_two_bits(self) -> ClusterConfig:
        if self.codebook != "uniform":
            return self
        named = {"conv_bits": self.conv_bits, "linear_bits": self.linear_bits,
                 **{f"overrides.{k}": v for k, v in self.overrides.items()}}
        if self.allocation is not None and self.allocation.choices:
            named["allocation.choices"] = min(self.allocation.choices)
        low = [f"{k} {v}" for k, v in named.items() if v is not None and v < 2]
        if low:
            raise ValueError("codebook 'uniform' needs at least 2 bits (a zero and ±1): "
                             + ", ".join(low))
        return self

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
        if cfg.allocation is not None and cfg.allocation.rule == "sensitivity":
            problems += check_scan(cfg.allocation.scan, view, "allocation.scan"
                                   if cfg.allocation.scan else "allocation")
        return problems + check_distill(cfg.distill, model, view, "distill")

    def _allocate(self, bits: dict[str, int], artifact: Artifact, ctx: StageContext
                  ) -> dict[str, int]:
        """Bits per layer under the bytes budget; logged and printed per layer."""
        alloc = self.config.allocation
        params = dict(artifact.model.named_parameters())
        # a pruned layer stores the indices of its survivors only
        counts = {n: int(artifact.masks[n].sum()) if n in artifact.masks else params[n].numel()
                  for n in bits}
        curves = None
        choices = alloc.choices or list(range(1, 9))
        if alloc.rule == "sensitivity":
            scanned = bits_curves(resolve_scan(artifact, ctx, alloc.scan))
            missing = [n for n in bits if n not in scanned]
            if missing:
                raise CompressPipeError(f"stage {ctx.name!r}: the sensitivity scan has no bits "
                                        f"points for {', '.join(missing[:3])}")
            curves = {n: scanned[n] for n in bits}
            choices = alloc.choices or sorted({b for c in curves.values() for b, _ in c})
        if self.config.codebook == "uniform":  # a grid needs a zero and ±1: 2 bits at least
            choices = [b for b in choices if b >= 2]
            if not choices:
                raise CompressPipeError(f"stage {ctx.name!r}: allocation: codebook 'uniform' "
                                        "needs at least 2 bits, and the bits offered are all 1")
        try:
            chosen = bits_under_budget(counts, curves, alloc.budget_bytes, choices)
        except ValueError as exc:
            raise CompressPipeError(f"stage {ctx.name!r}: allocation.budget_bytes: {exc}") from None
        used = clustered_bytes(counts, chosen)
        ctx.log_metrics({"cluster_budget_bytes": float(alloc.budget_bytes),
                         "cluster_allocated_bytes": float(used),
                         **{f"cluster_bits.{n.removesuffix('.weight')}": float(b)
                            for n, b in chosen.items()}}, None)
        print(f"[{ctx.name}] bits under {alloc.budget_bytes:,} bytes ({alloc.rule}): {used:,} "
              "bytes, " + ", ".join(f"{n.removesuffix('.weight')} {b}" for n, b in chosen.items()),
              flush=True)
        return chosen

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        cfg = self.config
        model = artifact.model.to(ctx.device)
        bits = layer_bits(model, cfg.conv_bits, cfg.linear_bits, cfg.overrides)
        if cfg.allocation is not None:
            bits = self._allocate(bits, artifact, ctx)
        layers = cluster_model(model, bits, artifact.masks, cfg.kmeans_iters,
                               QUANTIZERS[cfg.codebook])
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
        print(f"[{ctx.spec.name}] {len(layers)} layers clustered ({cfg.codebook}), "
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
