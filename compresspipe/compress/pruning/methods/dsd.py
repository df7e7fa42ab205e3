"""``dsd``: dense → sparse → re-dense (Han et al., 2017): train pruned, then let the pruned
weights come back at zero and train the dense network at a fraction of the LR."""

from __future__ import annotations

from ..pruner import Pruner
from ..registry import register_method


@register_method("dsd")
def dsd(pruner: Pruner) -> None:
    """The sparse phase, then the re-dense phase (which ends without masks of its own)."""
    d = pruner.cfg.dsd
    stats = pruner.prune_to(pruner.cfg.target_sparsity())
    last = pruner.train(d.sparse_epochs, key="sparse")
    pruner.log_phase(1, last, stats)
    # re-dense: pruned weights come back at zero and train again at a tenth of the LR
    pruner.masks = {}
    last = pruner.train(d.redense_epochs, key="redense", lr_scale=d.lr_factor)
    pruner.log_phase(2, last, {})
