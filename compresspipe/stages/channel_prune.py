"""``channel_prune``: remove whole channels, filters and heads through Torch-Pruning's dependency
graph, to a channel, parameter or MACs budget, in one or several steps with fine-tuning."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator
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
from ..compress.structured.latency_budget import latency_ratio, pruned_copy, search_latency
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


class LatencyTarget(StrictModel):
    """Prune to a measured latency instead of a count: the least MACs removal (bisection, the
    usual allocation) whose pruned copy times at most this fraction of the incoming model."""

    latency: float = Field(..., gt=0, lt=1, description="Pruned latency as a fraction of the "
                           "incoming model's (0.5: twice as fast), timed with the stage's "
                           "'latency' settings on this machine; the worst batch size counts.")
    search_steps: int = Field(6, ge=1, le=20, description="Bisection steps over the MACs "
                              "removed; each builds and times one pruned copy.")


def _target_kind(value: Any) -> str:
    return "budget" if isinstance(value, (dict, LatencyTarget)) else "count"


# a mapping is a latency budget, anything else a count: errors then speak of one kind only
CountOrLatency = Annotated[
    Annotated[Literal["channels", "params", "macs"], Tag("count")]
    | Annotated[LatencyTarget, Tag("budget")], Discriminator(_target_kind)]


class ChannelPruneConfig(StageConfig):
    criterion: Literal["l1", "l2", "bn_scale", "fpgm", "taylor"] = Field(
        "l1", description="Channel importance: filter L1/L2 norm, BatchNorm scale (network "
        "slimming), FPGM (geometric median), first-order Taylor.")
    target: CountOrLatency = Field(
        "macs", description="What 'ratio' removes a fraction of, or {latency: f}: prune until "
        "the measured latency is f of the incoming model's ('ratio' does not apply).")
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
    round_to: int = Field(8, ge=1, le=1024, description="Keep channel counts at multiples of "
                          "this. 8 by default: with odd widths onnxruntime leaves its blocked "
                          "(NCHWc) convolutions, and MobileNetV3 at 2x fewer MACs ran 0.68x as "
                          "fast as dense instead of 2.6x (benchmarks/structured_deploy.py); "
                          "1 gives exact budgets on tiny models.")
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

    @property
    def latency_target(self) -> LatencyTarget | None:
        return self.target if isinstance(self.target, LatencyTarget) else None

    @property
    def counted(self) -> str:
        """The cost the allocation counts: the target, or MACs under a latency budget."""
        return "macs" if self.latency_target else self.target

    @model_validator(mode="after")
    def _latency_target_needs_timing(self) -> ChannelPruneConfig:
        if self.latency_target is None:
            return self
        if self.latency is None:
            raise ValueError("target {latency: ...} is timed with the stage's 'latency' "
                             "settings; remove 'latency: null'")
        if "ratio" in self.model_fields_set:
            raise ValueError("'ratio' does not apply with target {latency: ...}: the search "
                             "picks the MACs removed; remove 'ratio'")
        return self

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
        if cfg.latency_target is not None:  # timed at run time: nothing to plan here
            self.notes = plan_notes(self.name, graph, f"planned: latency at most "
                                    f"{cfg.latency_target.latency:g}x the incoming model's, "
                                    "searched over the MACs removed at run time")
            return []
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
        reference = float(CostModel(graph).evaluate()[cfg.counted])
        steps = []
        for step in range(1, cfg.steps + 1):
            if step > 1:
                graph = StructuredGraph(model, shape, cfg.ignore, budget_s=cfg.graph_budget_s)
            goal = reference * (1 - cfg.ratio * step / cfg.steps)
            steps.append(self._prune_step(graph, artifact, ctx, goal, step, dense))
            if cfg.train is not None and cfg.train.epochs > 0:
                ctx.trainer(model, cfg.train, masks=artifact.masks, key=f"finetune{step}").fit()
        target = cfg.latency_target.model_dump() if cfg.latency_target else cfg.target
        info = {"method": "channel_prune", "criterion": cfg.criterion, "target": target,
                "ratio": None if cfg.latency_target else cfg.ratio, "scope": cfg.scope, "steps": steps,
                "kept_groups": graph.skipped}
        record_result(artifact, ctx, dense, shape, cfg.latency, info)
        return artifact

    def _prune_step(self, graph: StructuredGraph, artifact: Artifact, ctx: StageContext,
                    goal: float, step: int, dense: nn.Module) -> dict:
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
        search = None
        if cfg.latency_target is None:
            allocation = allocate(graph, cost, scores, cfg.target, goal, cfg.scope,
                                  cfg.max_layer_ratio, cfg.round_to)
        else:
            search = self._latency_search(graph, cost, scores, dense, step, ctx)
            allocation = search.allocation
        widths = [{"group": g.name, "kind": g.kind, "kept": g.units - len(r), "total": g.units}
                  for g, r in zip(graph.groups, allocation.removals, strict=True)]
        artifact.masks = remove_units(graph, allocation.removals, artifact.masks)
        measured = count_macs(graph.model, graph.input_shape)
        ctx.log_metrics({"step_macs": measured["macs"], "step_params": measured["params"]}, step)
        result = {"step": step, "goal": allocation.target_value,
                  "predicted": allocation.predicted, "measured": measured, "group_widths": widths}
        if search is not None:
            result["latency_search"] = search.record()
        return result

    def _latency_search(self, graph: StructuredGraph, cost: CostModel, scores, dense: nn.Module,
                        step: int, ctx: StageContext):
        """This step's share of the latency budget, by bisection over the MACs removed from
        the current model; the chosen search is logged (goal, ratio measured, MACs removed)."""
        cfg, timing = self.config, self.config.latency
        goal = 1 - (1 - cfg.latency_target.latency) * step / cfg.steps
        macs = float(cost.evaluate()["macs"])

        def allocate_at(removed: float):
            return allocate(graph, cost, scores, "macs", macs * (1 - removed), cfg.scope,
                            cfg.max_layer_ratio, cfg.round_to)

        def measure(allocation) -> float:
            return latency_ratio(dense, pruned_copy(graph, allocation.removals),
                                 graph.input_shape, timing.batch_sizes, timing.repeats,
                                 timing.rounds, timing.threads)

        try:
            search = search_latency(allocate_at, measure, goal, cfg.latency_target.search_steps)
        except CompressPipeError as exc:
            raise CompressPipeError(f"stage {self.name!r}: {exc}") from exc
        ctx.log_metrics({"latency_goal": goal, "latency_search_ratio": search.latency_ratio,
                         "latency_search_macs_removed": search.macs_removed,
                         "latency_search_trials": float(len(search.trials))}, step)
        print(f"[{self.name}] latency budget {goal:.2f}x: {search.macs_removed:.1%} of the MACs "
              f"removed measured {search.latency_ratio:.2f}x ({len(search.trials)} trials)",
              flush=True)
        return search
