"""``oneshot``: prune to the target sparsity once, then retrain (weight rewinding first under
``retrain: wr``)."""

from __future__ import annotations

from ..pruner import Pruner
from ..registry import register_method


@register_method("oneshot")
def oneshot(pruner: Pruner) -> None:
    """One prune step, one retraining phase."""
    cfg = pruner.cfg
    stats = pruner.prune_to(cfg.target_sparsity())
    kind = cfg.retrain_kind()
    if kind == "wr":
        pruner.rewind()
    last = pruner.train(cfg.train.epochs, pruner.retrain_fn(kind, stats, cfg.train.epochs))
    pruner.log_phase(1, last, stats)
