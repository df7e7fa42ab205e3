"""``channel_prune``: remove whole channels, filters and heads through Torch-Pruning's dependency
graph, to a channel, parameter or MACs budget, in one or several steps with fine-tuning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from ..compress.structured.allocate import allocate, remove_units
from ..compress.structured.cost import CostModel
from ..compress.structured.graph import DEFAULT_BUDGET_S, StructuredGraph
from ..compress.structured.importance import (
    BatchNormL1,
    accumulate_gradients,
    group_batchnorms,
    make_importance,
    unit_scores,
)
from ..core.artifact import Artifact
from ..core.config import StrictModel, TrainConfig
from ..core.errors import CompressPipeError
from ..core.measure import count_macs
from .base import Stage, StageConfig
from .context import StageContext
from .registry import register_stage
from .spec import PipelineView
from .structured_support import check_graph, plan_notes, record_result, stage_start


class LatencyConfig(StrictModel):
    """CPU/GPU latency of the incoming and the pruned model, measured interleaved in one run."""

    batch_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1,
                                   description="Batch sizes to time.")
    repeats: int = Field(10, ge=1, le=10_000, description="Timed forward passes per round.")
    rounds: int = Field(3, ge=1, le=100, description="Interleaved rounds (dense, pruned, ...).")
    threads: int = Field(1, ge=1, le=512, description="torch intra-op threads while timing.")

    @model_validator(mode="after")
    def _positive(self) -> LatencyConfig:
        if any(b < 1 for b in self.batch_sizes):
            raise ValueError("batch sizes must be at least 1")
        return self


class SparsityConfig(StrictModel):
    """Network slimming: train with an L1 penalty on the BatchNorm scales before pruning."""

    l1: float = Field(1e-4, gt=0, le=1, description="lambda of lambda * sum|gamma|.")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=5))


class ChannelPruneConfig(StageConfig):
    criterion: Literal["l1", "l2", "bn_scale", "fpgm", "taylor"] = Field(
        "l1", description="Channel importance: filter L1/L2 norm, BatchNorm scale (network "
        "slimming), FPGM (geometric median), first-order Taylor.")
    target: Literal["channels", "params", "macs"] = Field(
        "macs", description="What 'ratio' removes a fraction of.")
    ratio: float = Field(0.5, gt=0, lt=1, description="Fraction of the target removed: 0.5 "
                         "halves the MACs (2x), 0.75 quarters them (4x).")
    scope: Literal["global", "uniform"] = Field(
        "global", description="Rank channels across all layers, or remove the same fraction of "
        "every layer.")
    steps: int = Field(1, ge=1, le=100, description="Prune in this many equal steps, "
                       "fine-tuning after each.")
    train: TrainConfig | None = Field(None, description="Fine-tuning after every step.")
    ignore: list[str] = Field(default_factory=list, description="Module-name patterns (fnmatch) "
                              "whose output channels are kept; the classifier always is.")
    max_layer_ratio: float = Field(0.9, gt=0, lt=1, description="No layer loses more than this "
                                   "fraction of its channels.")
    round_to: int = Field(1, ge=1, le=1024, description="Keep channel counts at multiples of "
                          "this (hardware-friendly widths).")
    taylor_batches: int = Field(8, ge=1, le=100_000, description="'taylor': training batches "
                                "whose gradients are summed.")
    sparsity: SparsityConfig | None = Field(None, description="'bn_scale' only: L1 sparsity "
                                            "training on BatchNorm scales before pruning.")
    latency: LatencyConfig | None = Field(default_factory=LatencyConfig,
                                          description="Measure latency (null: skip).")
    graph_budget_s: float = Field(DEFAULT_BUDGET_S, gt=0, le=3600, description="CPU "
                                  "seconds building the channel groups may take before validation "
                                  "stops with a message; a single group that does not resolve "
                                  "keeps its width.")

    @model_validator(mode="after")
    def _sparsity_needs_bn_scale(self) -> ChannelPruneConfig:
        if self.sparsity is not None and self.criterion != "bn_scale":
            raise ValueError("'sparsity' trains the BatchNorm scales that only criterion "
                             "'bn_scale' reads; set criterion: bn_scale or remove 'sparsity'")
        return self


@register_stage("channel_prune")
class ChannelPruneStage(Stage):
    """Physically remove channels (Torch-Pruning dependency graph) to a budget."""

    Config = ChannelPruneConfig

    def check(self, model: nn.Module, view: PipelineView) -> list[tuple[str, str]]:
        """The dependency graph with a dry run of every group's removal, and the plan: the
        budget reached with L1 scores of the weights at hand (the real criterion may pick
        other channels, never a smaller reach)."""
        cfg = self.config
        self.notes = []
        graph, problems = check_graph(model, view.data, cfg.ignore, budget_s=cfg.graph_budget_s)
        if problems:
            return problems
        if cfg.criterion == "bn_scale" and all(
                s is None for s in unit_scores(graph, make_importance("bn_scale"))):
            return [("criterion", "'bn_scale' reads BatchNorm scales, and no prunable "
                     "group of this model has a BatchNorm layer; use l1, l2, fpgm or taylor")]
        cost = CostModel(graph)
        reference = float(cost.evaluate()[cfg.target])
        try:
            allocation = allocate(graph, cost, unit_scores(graph, make_importance("l1")),
                                  cfg.target, reference * (1 - cfg.ratio), cfg.scope,
                                  cfg.max_layer_ratio, cfg.round_to)
        except CompressPipeError as exc:
            return [("ratio", str(exc))]
        reached = reference / max(allocation.predicted[cfg.target], 1.0)
        self.notes = plan_notes(self.name, graph, f"planned {reached:.2f}x fewer {cfg.target}")
        return []

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        cfg = self.config
        model, shape, dense, graph = stage_start(artifact, ctx, self.name, cfg.ignore,
                                                 budget_s=cfg.graph_budget_s)
        if cfg.sparsity is not None:
            hook = BatchNormL1(group_batchnorms(graph), cfg.sparsity.l1)
            ctx.trainer(model, cfg.sparsity.train, hooks=[hook], masks=artifact.masks,
                        key="sparsity").fit()
        reference = float(CostModel(graph).evaluate()[cfg.target])
        steps = []
        for step in range(1, cfg.steps + 1):
            if step > 1:
                graph = StructuredGraph(model, shape, cfg.ignore, budget_s=cfg.graph_budget_s)
            goal = reference * (1 - cfg.ratio * step / cfg.steps)
            steps.append(self._prune_step(graph, artifact, ctx, goal, step))
            if cfg.train is not None and cfg.train.epochs > 0:
                ctx.trainer(model, cfg.train, masks=artifact.masks, key=f"finetune{step}").fit()
        info = {"method": "channel_prune", "criterion": cfg.criterion, "target": cfg.target,
                "ratio": cfg.ratio, "scope": cfg.scope, "steps": steps,
                "kept_groups": graph.skipped}
        record_result(artifact, ctx, dense, shape, cfg.latency, info)
        return artifact

    def _prune_step(self, graph: StructuredGraph, artifact: Artifact, ctx: StageContext, goal: float,
                    step: int) -> dict:
        """Score, allocate and remove one step's channels; return what was predicted."""
        cfg = self.config
        cost = CostModel(graph)
        if cfg.criterion == "taylor":
            accumulate_gradients(graph.model, ctx.data.train_loader(shard=False), ctx.device,
                                 cfg.taylor_batches)
        scores = unit_scores(graph, make_importance(cfg.criterion))
        if all(s is None for s in scores):
            raise CompressPipeError(f"stage {self.name!r}: criterion {cfg.criterion!r} finds "
                                    "nothing to score in any prunable group")
        allocation = allocate(graph, cost, scores, cfg.target, goal, cfg.scope,
                              cfg.max_layer_ratio, cfg.round_to)
        widths = [{"group": g.name, "kind": g.kind, "kept": g.units - len(r), "total": g.units}
                  for g, r in zip(graph.groups, allocation.removals, strict=True)]
        artifact.masks = remove_units(graph, allocation.removals, artifact.masks)
        measured = count_macs(graph.model, graph.input_shape)
        ctx.log_metrics({"step_macs": measured["macs"], "step_params": measured["params"]}, step)
        return {"step": step, "goal": goal, "predicted": allocation.predicted,
                "measured": measured, "group_widths": widths}
