"""``bimp``: budgeted IMP (Zimmer et al., 2023): one total epoch budget, a dense phase first, the
rest split over the prune rounds, each retrained with ALLR."""

from __future__ import annotations

from ..pruner import Pruner
from ..registry import register_method
from ..schedules import OriginalSchedule, imp_sparsities


@register_method("bimp")
def bimp(pruner: Pruner) -> None:
    """Dense phase, then the rounds with integer epochs that add up to the budget."""
    cfg = pruner.cfg
    budget = cfg.bimp
    assert budget is not None
    pruner.train(budget.dense_epochs, key="dense")
    # the dense phase just ran: it defines η_max and T_train for ALLR
    pruner.original = OriginalSchedule(cfg.train.model_copy(update={"epochs": budget.dense_epochs}),
                                       max(1, len(pruner.ctx.data.train_loader())))
    per_round = (budget.total_epochs - budget.dense_epochs) / cfg.rounds
    kind = cfg.retrain_kind()
    spent = 0
    for r, s in enumerate(imp_sparsities(cfg.target_sparsity(), cfg.rounds), 1):
        epochs = int(round(per_round * r)) - spent  # integer epochs that add up to T − T0
        spent += epochs
        stats = pruner.prune_to(s)
        last = pruner.train(epochs, pruner.retrain_fn(kind, stats, epochs))
        pruner.log_phase(r, last, stats)
