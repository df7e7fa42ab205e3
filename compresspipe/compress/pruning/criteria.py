"""Importance criteria: each maps target parameters to scores; higher scores are kept.

Criteria are registered by name and combine freely with any scope, granularity and schedule.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Scores = dict[str, torch.Tensor]


@dataclass
class ScoreInput:
    """What a criterion may use: the model, the targets, data and the current masks."""

    model: nn.Module
    targets: list[str]  # parameter names that take part
    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    seed: int = 0
    input_shape: tuple[int, ...] = ()  # (C, H, W) for data-free criteria


CRITERIA: dict[str, Callable[[ScoreInput], Scores]] = {}
NEEDS_DATA = {"snip", "grasp", "wanda"}


def register_criterion(name: str):
    def wrap(fn: Callable[[ScoreInput], Scores]) -> Callable[[ScoreInput], Scores]:
        CRITERIA[name] = fn
        return fn

    return wrap


def _params(inp: ScoreInput) -> dict[str, nn.Parameter]:
    named = dict(inp.model.named_parameters())
    return {n: named[n] for n in inp.targets}


@register_criterion("magnitude")
def magnitude(inp: ScoreInput) -> Scores:
    """|w| (Han et al. 2015; the LTH and BIMP criterion)."""
    return {n: p.detach().abs().clone() for n, p in _params(inp).items()}


@register_criterion("random")
def random(inp: ScoreInput) -> Scores:
    """Uniform random scores: the control every criterion must beat."""
    g = torch.Generator().manual_seed(inp.seed)
    return {n: torch.rand(p.shape, generator=g) for n, p in _params(inp).items()}


def _private_copy(inp: ScoreInput) -> ScoreInput:
    """Gradient criteria run forward passes in train mode; a copy keeps the caller's BatchNorm
    statistics untouched."""
    return ScoreInput(copy.deepcopy(inp.model), inp.targets, inp.batches, inp.masks, inp.seed,
                      inp.input_shape)


def _loss_grads(inp: ScoreInput) -> tuple[list, list[torch.Tensor]]:
    params = list(_params(inp).values())
    device = params[0].device
    grads = [torch.zeros_like(p) for p in params]
    for x, y in inp.batches:
        loss = F.cross_entropy(inp.model(x.to(device)), y.to(device))
        for acc, g in zip(grads, torch.autograd.grad(loss, params), strict=True):
            acc += g / len(inp.batches)
    return params, grads


@register_criterion("snip")
def snip(inp: ScoreInput) -> Scores:
    """SNIP (Lee et al. 2019): |g ⊙ w| of the loss on a few batches."""
    inp = _private_copy(inp)
    with _train_mode(inp.model):
        params, grads = _loss_grads(inp)
    return {n: (g * p.detach()).abs() for n, p, g in zip(inp.targets, params, grads, strict=True)}


@register_criterion("grasp")
def grasp(inp: ScoreInput) -> Scores:
    """GraSP (Wang et al. 2020): S = −w ⊙ Hg, remove the highest S, i.e. keep the highest w ⊙ Hg."""
    inp = _private_copy(inp)
    with _train_mode(inp.model):
        params, grads = _loss_grads(inp)
        hg = [torch.zeros_like(p) for p in params]
        device = params[0].device
        for x, y in inp.batches:
            loss = F.cross_entropy(inp.model(x.to(device)), y.to(device))
            g = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((gi * gd.detach()).sum() for gi, gd in zip(g, grads, strict=True))
            for acc, h in zip(hg, torch.autograd.grad(dot, params), strict=True):
                acc += h / len(inp.batches)
    return {n: p.detach() * h for n, p, h in zip(inp.targets, params, hg, strict=True)}


@register_criterion("synflow")
def synflow(inp: ScoreInput) -> Scores:
    """SynFlow (Tanaka et al. 2020): data-free |w ⊙ dR/dw| with R = sum(f_|w|(1)).

    Computed in float64 on a copy with absolute weights and current masks applied, because the
    product over layers under/overflows in float32. Iterating over many rounds is the schedule's
    job (method at_init with ``rounds``)."""
    model = copy.deepcopy(inp.model).double().eval()
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, p in named.items():
            p.abs_()
            if n in inp.masks:
                p.mul_(inp.masks[n].to(p.device, torch.float64))
    ones = torch.ones((1, *inp.input_shape), dtype=torch.float64, device=next(model.parameters()).device)
    params = [named[n] for n in inp.targets]
    total = model(ones).sum()
    grads = torch.autograd.grad(total, params)
    return {n: (g * p).detach().abs().float() for n, p, g in zip(inp.targets, params, grads, strict=True)}


@register_criterion("wanda")
def wanda(inp: ScoreInput) -> Scores:
    """Wanda (Sun et al. 2024): |w| · ‖x‖₂ of the input feature each weight multiplies.

    For Linear layers x is the input feature; for convolutions the input channel's norm."""
    modules = dict(inp.model.named_modules())
    norms: dict[str, torch.Tensor] = {}
    handles = []
    for name in inp.targets:
        module = modules[name.rsplit(".", 1)[0]]

        def record(mod, args, _out, key=name):
            x = args[0].detach()
            # reduce over every dimension except the feature/channel one
            flat = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() > 2 and isinstance(
                mod, nn.Conv2d) else x.reshape(-1, x.shape[-1]).t()
            norms[key] = norms.get(key, 0) + flat.pow(2).sum(dim=1)

        handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad(), _eval_mode(inp.model):
            device = next(inp.model.parameters()).device
            for x, _ in inp.batches:
                inp.model(x.to(device))
    finally:
        for h in handles:
            h.remove()
    scores = {}
    for n, p in _params(inp).items():
        col = norms[n].sqrt()
        shape = (1, -1) + (1,) * (p.dim() - 2)
        scores[n] = p.detach().abs() * col.view(shape)
    return scores


class _train_mode:
    def __init__(self, model: nn.Module, mode: bool = True):
        self.model, self.mode = model, mode

    def __enter__(self):
        self.was = self.model.training
        self.model.train(self.mode)

    def __exit__(self, *exc):
        self.model.train(self.was)


def _eval_mode(model: nn.Module) -> _train_mode:
    return _train_mode(model, False)
