"""``gmp``: gradual magnitude pruning during training (Zhu & Gupta, 2017): every Δt optimizer
steps from t0 the masks follow the cubic curve from s_i to s_f, then stay frozen."""

from __future__ import annotations

import torch
from torch import nn

from ....core.artifact_keys import buffer_name
from ....core.errors import CompressPipeError
from ....core.training import Trainer, TrainHook
from ..pruner import Pruner
from ..registry import register_method
from ..schedules import cubic_sparsity
from ..scopes import overall_sparsity


@register_method("gmp")
def gmp(pruner: Pruner) -> None:
    """One training phase whose hook prunes along the schedule (only inherited masks fixed)."""
    cfg = pruner.cfg
    epochs = cfg.train.epochs
    spe = max(1, len(pruner.ctx.data.train_loader()))
    g = cfg.gmp
    t0 = int(round(g.start_epoch * spe))
    end = int(round((g.end_epoch if g.end_epoch is not None else 0.75 * epochs) * spe))
    if end <= t0 or end > epochs * spe:
        raise CompressPipeError(f"stage {pruner.ctx.name!r}: gmp end_epoch must lie after "
                                f"start_epoch and within the {epochs} training epochs")
    n = max(1, (end - t0) // g.frequency)
    hook = GradualHook(pruner, g.initial_sparsity, cfg.target_sparsity(), t0, n, g.frequency)
    last = pruner.train(epochs, extra_hooks=[hook], masks=pruner.inherited)
    pruner.log_phase(1, last, {"final_step_sparsity": hook.current})


class GradualHook(TrainHook):
    """Zhu & Gupta: masks follow the cubic curve every Δt steps, then stay frozen at s_f."""

    def __init__(self, pruner: Pruner, s_i: float, s_f: float, t0: int, n: int, dt: int):
        self.pruner, self.s_i, self.s_f, self.t0, self.n, self.dt = pruner, s_i, s_f, t0, n, dt
        params = dict(pruner.model.named_parameters())
        # mask state lives in buffers so epoch checkpoints carry it across a resume
        self.state = nn.Module()
        for name in pruner.targets.names:
            self.state.register_buffer(buffer_name(name),
                                       torch.ones_like(params[name], dtype=torch.bool))
        self.current = 0.0

    def modules(self) -> dict[str, nn.Module]:
        return {"gmp_masks": self.state}

    def on_train_start(self, trainer: Trainer) -> None:
        self._sync_from_state()
        self.pruner.apply_masks()

    def _sync_from_state(self) -> None:
        self.pruner.masks = {n: getattr(self.state, buffer_name(n)).clone().cpu()
                             for n in self.pruner.targets.names}
        self.current = overall_sparsity(self.pruner.masks)

    def after_step(self, model: nn.Module, step: int) -> None:
        t = step - self.t0
        if 0 <= t <= self.n * self.dt and t % self.dt == 0:
            target = cubic_sparsity(step, self.s_i, self.s_f, self.t0, self.n, self.dt)
            if target > self.current:
                scores = {n: p.detach().abs() for n, p in model.named_parameters()
                          if n in self.pruner.targets.names}
                self.pruner.prune_to(target, scores)
                for name, mask in self.pruner.masks.items():
                    getattr(self.state, buffer_name(name)).copy_(mask)
                self.current = target
        self.pruner.apply_masks()
