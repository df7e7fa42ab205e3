"""Pruning masks applied to a model, and as a training hook: pruned weights stay exactly zero
through any training."""

from __future__ import annotations

import torch
from torch import nn

from .training import TrainHook


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every weight of ``model`` that ``masks`` (parameter name -> 0/1 tensor) prunes."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].device, params[name].dtype))


class MaskHook(TrainHook):
    """Zeroes masked weights before training and after every optimizer step."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks
        self._targets: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_start(self, trainer) -> None:
        params = dict(trainer.model.named_parameters())
        self._targets = [(params[n], m.to(params[n].device, dtype=params[n].dtype))
                         for n, m in self.masks.items()]
        self.apply()

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        return self.masks

    @torch.no_grad()
    def apply(self) -> None:
        for param, mask in self._targets:
            param.mul_(mask)

    def after_step(self, model: nn.Module, step: int) -> None:
        self.apply()
