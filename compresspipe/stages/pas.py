"""``pas``: Pruning-as-Search — learn every layer's width with binary gates under a MACs budget,
then remove the gated-off channels physically and fine-tune."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from ..compress.structured.allocate import remove_units
from ..compress.structured.cost import CostModel
from ..compress.structured.graph import DEFAULT_BUDGET_S
from ..compress.structured.pas import PaSHook
from ..core.artifact import Artifact
from ..core.config import TrainConfig
from .base import Stage, StageConfig
from .channel_prune import LatencyConfig
from .context import StageContext
from .registry import register_stage
from .spec import PipelineView
from .structured_support import check_graph, plan_notes, record_result, stage_start


class PaSConfig(StageConfig):
    p: float = Field(0.3, gt=0, lt=1, description="Fraction of the dense MACs to remove "
                     "(0.5: 2x fewer MACs).")
    alpha: float = Field(0.1, ge=0, le=1000, description="Weight of the MACs term "
                         "alpha * N/10 * ((MACs - (1-p) MACs_dense) / MACs_dense)^2, N gates.")
    gate_scale: float | None = Field(
        None, gt=0, le=1e4, description="Gates are stored divided by this: SGD moves them "
        "gate_scale^2 times faster than weights (Adam gate_scale times). Default: set from the "
        "search's length, learning rate and optimiser, so that the budget alone would take the "
        "most pulled gate across the threshold within the first half of the search.")
    search: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=5),
                                description="Search: weights and gates trained together.")
    finetune: TrainConfig | None = Field(None, description="Fine-tuning after the removal.")
    budget: Literal["exact", "search"] = Field(
        "exact", description="'search': remove exactly the channels whose gate is off; "
        "'exact': scale the searched widths by one common factor until the MACs budget is met "
        "(each layer keeps its strongest gates), then give single channels back while it holds.")
    ignore: list[str] = Field(default_factory=list, description="Module-name patterns (fnmatch) "
                              "whose output channels are not searched; the classifier never is.")
    max_layer_ratio: float = Field(0.9, gt=0, lt=1, description="'exact': no layer loses more "
                                   "than this fraction of its channels.")
    latency: LatencyConfig | None = Field(default_factory=LatencyConfig,
                                          description="Measure latency (null: skip).")
    graph_budget_s: float = Field(DEFAULT_BUDGET_S, gt=0, le=3600, description="CPU "
                                  "seconds building the channel groups may take before validation "
                                  "stops with a message.")


@register_stage("pas")
class PaSStage(Stage):
    """Differentiable width search with DBC gates, then physical channel removal."""

    Config = PaSConfig

    def check(self, model: nn.Module, view: PipelineView) -> list[tuple[str, str]]:
        graph, problems = check_graph(model, view.data, self.config.ignore, "searched",
                                      need_gateable=True, budget_s=self.config.graph_budget_s)
        self.notes = plan_notes(self.name, graph) if graph is not None else []
        return problems

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        cfg = self.config
        model, shape, dense, graph = stage_start(artifact, ctx, self.name, cfg.ignore,
                                                 "searched", need_gateable=True,
                                                 budget_s=cfg.graph_budget_s)
        cost = CostModel(graph)
        search = PaSHook(graph, cost, cfg.p, cfg.alpha, cfg.gate_scale)
        try:
            ctx.trainer(model, cfg.search, hooks=[search], masks=artifact.masks,
                        key="search").fit()
        finally:
            search.remove()
        searched = search.searched_widths()
        searched_ratio = float(search.macs_ratio().detach())
        allocation = search.removals(cfg.budget, cfg.max_layer_ratio)
        artifact.masks = remove_units(graph, allocation.removals, artifact.masks)
        if cfg.finetune is not None and cfg.finetune.epochs > 0:
            ctx.trainer(model, cfg.finetune, masks=artifact.masks, key="finetune").fit()
        info = {"method": "pas", "p": cfg.p, "alpha": cfg.alpha, "budget": cfg.budget,
                "gate_scale": search.gates[0].scale,
                "searched_macs_ratio": searched_ratio, "searched_widths": searched,
                "predicted": allocation.predicted, "kept_groups": graph.skipped}
        record_result(artifact, ctx, dense, shape, cfg.latency, info)
        return artifact
