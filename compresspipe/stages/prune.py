"""``prune``: unstructured and N:M pruning, composed from criteria × scope × schedule.

Methods: oneshot, imp (rounds at 1 − (1 − s)^(1/n)), lth (IMP + weight rewinding, with an
optional random re-initialisation control), bimp (one epoch budget, ALLR retraining), gmp (Zhu &
Gupta's cubic schedule during training), dsd (dense → sparse → re-dense) and at_init (SNIP,
GraSP, SynFlow, random, before training). The ``train`` block gives the optimizer, the epochs of
each (re)training phase and the other loop settings; the ``retrain`` schedule replaces its LR
schedule after a prune step.

The config (``PruneConfig``, re-exported here) and the methods live in
``compresspipe.compress.pruning``; this stage checks a config against the real model and runs
the registered method with the run's distillation hook and, for ``rewind_to: init``, the
pipeline's initial weights.
"""

from __future__ import annotations

from torch import nn

from ..compress.pruning.config import PruneConfig
from ..compress.pruning.methods import get_method
from ..compress.pruning.pruner import Pruner
from ..compress.pruning.scopes import parse_nm, prunable_weights, select_targets
from ..compress.sensitivity import loss_curves
from ..core.artifact import Artifact
from .base import Stage
from .context import StageContext
from .patterns import unmatched_pattern_problems
from .registry import register_stage
from .sensitivity import check_scan, resolve_scan
from .spec import INPUT_STAGE, PipelineView
from .teacher import check_distill, distill_hook

__all__ = ["PruneConfig", "PruneStage"]  # PruneConfig lives with the algorithm; kept here too


@register_stage("prune")
class PruneStage(Stage):
    """Unstructured / N:M pruning: oneshot, IMP, LTH, BIMP+ALLR, GMP, DSD, pruning at init."""

    Config = PruneConfig

    def check(self, model: nn.Module, view: PipelineView) -> list[tuple[str, str]]:
        c = self.config
        problems = unmatched_pattern_problems(model, c.include, "include", weights=True)
        problems += unmatched_pattern_problems(model, c.exclude, "exclude", weights=True)
        problems += unmatched_pattern_problems(model, list(c.overrides), "overrides",
                                               weights=True, by_key=True)
        if problems:
            return problems
        targets = select_targets(model, c.include, c.exclude, c.first_layer, c.classifier,
                                 c.overrides, c.min_layer_keep)
        if not targets.names:
            problems.append(("include", f"no weight takes part (prunable weights: "
                             f"{', '.join(prunable_weights(model)[:6])}, ...)"))
        if c.granularity != "unstructured":
            n, m = parse_nm(c.granularity)
            params = dict(model.named_parameters())
            for name in targets.names:
                p = params[name]
                if p.shape[1] % m:
                    problems.append(("granularity", f"{c.granularity}: input dimension of "
                                     f"{name!r} is {p.shape[1]}, not a multiple of {m}; exclude it"))
        if c.criterion == "wanda" and c.method == "at_init":
            problems.append(("criterion", "wanda needs trained weights and activations"))
        needs_rewind = c.retrain_kind() == "wr" and c.rewind_to == "recorded"
        if needs_rewind and not any(getattr(s.config, "record_rewind", None) for s in view.earlier):
            problems.append(("rewind_to", "weight rewinding needs a rewind point: add "
                             "record_rewind: {epoch: 1} to an earlier train stage, or set "
                             "rewind_to: init"))
        if c.allocation is not None and c.allocation.rule == "sensitivity":
            problems += check_scan(c.allocation.scan, view,
                                   "allocation.scan" if c.allocation.scan else "allocation")
        return problems + check_distill(c.distill, model, view, "distill")

    def run(self, artifact: Artifact, ctx: StageContext) -> Artifact:
        cfg = self.config
        # distillation joins every retraining phase; the initial weights load only if rewound to
        hooks = (lambda model: [distill_hook(cfg.distill, ctx, model)]) if cfg.distill is not None else None
        curves = None
        if cfg.allocation is not None and cfg.allocation.rule == "sensitivity":
            curves = loss_curves(resolve_scan(artifact, ctx, cfg.allocation.scan))
        pruner = Pruner(cfg, artifact, ctx, hooks=hooks,
                        initial_state=lambda: ctx.load_stage(INPUT_STAGE).model.state_dict(),
                        curves=curves)
        get_method(cfg.method)(pruner)
        return pruner.finish()
