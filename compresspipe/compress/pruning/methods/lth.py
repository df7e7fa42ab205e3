"""``lth``: the lottery ticket, IMP with weight rewinding; with ``control`` the same mask is also
trained from a fresh random initialisation, the comparison that makes a ticket a ticket."""

from __future__ import annotations

import math

import torch

from ....core.masks import apply_masks
from ....core.models import build_from_spec
from ..pruner import Pruner
from ..registry import register_method
from ..schedules import retrain_schedule
from .imp import imp


@register_method("lth")
def lth(pruner: Pruner) -> None:
    """IMP (the config makes it rewind), then the optional random re-initialisation control."""
    imp(pruner)
    if not pruner.cfg.control:
        return
    # the control that makes a ticket a ticket: the same mask from a fresh initialisation
    torch.manual_seed(pruner.ctx.seed + 7919)
    fresh = build_from_spec(pruner.artifact.spec).to(pruner.ctx.device)
    masks = pruner.all_masks()
    apply_masks(fresh, masks)
    lr_fn = retrain_schedule("wr", pruner.original, rewind_step=pruner.rewind_step())
    last = pruner.train(pruner.cfg.train.epochs, lr_fn, key="control", masks=masks, model=fresh,
                        phase_hooks=False)
    pruner.ctx.log_metrics({"control_top1": last.get("val_top1", math.nan),
                            "control_loss": last.get("val_loss", math.nan)}, None)
    print(f"[{pruner.ctx.name}] random re-init control: top1 {last.get('val_top1', 0):.2f}%",
          flush=True)
