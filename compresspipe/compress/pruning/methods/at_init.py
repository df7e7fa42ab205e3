"""``at_init``: prune before training (SNIP, GraSP, SynFlow, random, or magnitude), then train
the sparse network; unstructured SynFlow prunes in rounds to avoid layer collapse."""

from __future__ import annotations

from ..pruner import Pruner
from ..registry import register_method


@register_method("at_init")
def at_init(pruner: Pruner) -> None:
    """Prune (SynFlow: ``synflow_rounds`` steps), then one training phase."""
    cfg = pruner.cfg
    s = cfg.target_sparsity()
    if cfg.criterion == "synflow" and cfg.granularity == "unstructured":
        rounds = cfg.synflow_rounds
        # exponential schedule: equal pruning ratios per round avoid layer collapse
        for r in range(1, rounds + 1):
            stats = pruner.prune_to(1 - (1 - s) ** (r / rounds))
    else:
        stats = pruner.prune_to(s)
    last = pruner.train(cfg.train.epochs, key="train")
    pruner.log_phase(1, last, stats)
