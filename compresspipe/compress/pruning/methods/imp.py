"""``imp``: iterative magnitude pruning, ``rounds`` prune-retrain rounds whose sparsities follow
1 − (1 − s)^(r/n) (the same fraction of the survivors each round)."""

from __future__ import annotations

from ..pruner import Pruner
from ..registry import register_method
from ..schedules import imp_sparsities


@register_method("imp")
def imp(pruner: Pruner) -> None:
    """Prune, (rewind,) retrain and log, once per round."""
    cfg = pruner.cfg
    kind = cfg.retrain_kind()
    for r, s in enumerate(imp_sparsities(cfg.target_sparsity(), cfg.rounds), 1):
        stats = pruner.prune_to(s)
        if kind == "wr":
            pruner.rewind()
        last = pruner.train(cfg.train.epochs, pruner.retrain_fn(kind, stats, cfg.train.epochs))
        pruner.log_phase(r, last, stats)
