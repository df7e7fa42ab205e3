"""The knowledge-distillation loss terms and the feature plumbing they need.

Hinton's soft-target term and one feature term per configured layer pair:

    alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
        + sum_i weight_i * MSE(adapter_i(f_s_i), f_t_i)

plus what reads the feature maps (forward hooks, a probe with one all-zero batch) and the checks
that a named layer exists and that two feature shapes can be adapted to each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import CompressPipeError, suggest

PROBE_BATCH = 2  # BatchNorm in train mode needs more than one value per channel


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), summed over classes, mean over the batch.

    The T^2 factor keeps the soft-target gradients on the scale of the hard-label ones
    (Hinton et al. 2015)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return t * t * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """MSE between an adapted student feature and the teacher's; feature maps of different
    spatial size are average-pooled to the smaller one."""
    if student_feat.dim() == 4 and student_feat.shape[-2:] != teacher_feat.shape[-2:]:
        size = (min(student_feat.shape[-2], teacher_feat.shape[-2]),
                min(student_feat.shape[-1], teacher_feat.shape[-1]))
        student_feat = F.adaptive_avg_pool2d(student_feat, size)
        teacher_feat = F.adaptive_avg_pool2d(teacher_feat, size)
    return F.mse_loss(student_feat.float(), teacher_feat.float())


class FeatureAdapter(nn.Module):
    """Learned map from a student feature to the teacher's width: a 1x1 convolution for
    (N, C, H, W) maps, a linear layer for (N, L, C) tokens and (N, C) vectors."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        problem = feature_mismatch(student_shape, teacher_shape)
        if problem:
            raise CompressPipeError(problem)
        if len(student_shape) == 4:
            self.proj: nn.Module = nn.Conv2d(student_shape[1], teacher_shape[1], 1)
        else:
            self.proj = nn.Linear(student_shape[-1], teacher_shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def feature_mismatch(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> str | None:
    """Why two feature shapes cannot be matched by an adapter, or None if they can."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) != len(t) or len(s) not in (2, 3, 4):
        return (f"student feature of shape {list(s[1:])} cannot be mapped onto teacher feature of "
                f"shape {list(t[1:])} (both must be (C, H, W) maps, (L, C) tokens or (C,) vectors)")
    if len(s) == 3 and s[1] != t[1]:
        return f"student has {s[1]} tokens, teacher {t[1]}; token features need equal counts"
    return None


# ---------------------------------------------------------------------------------------------
# Features and probing


@contextlib.contextmanager
def capture_features(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that store the output of each named module in the yielded dict."""
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(store_hook(store, n)) for n in names]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def store_hook(store: dict[str, torch.Tensor], name: str) -> Callable:
    """A forward hook that keeps module ``name``'s output tensor in ``store``."""
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, (tuple, list)):  # e.g. attention blocks returning (x, weights)
            output = output[0]
        if not isinstance(output, torch.Tensor):
            raise CompressPipeError(f"module {name!r} returns {type(output).__name__}, "
                                    "not a tensor; pick another layer for feature distillation")
        store[name] = output

    return hook


@torch.no_grad()
def probe(model: nn.Module, input_shape: tuple[int, int, int],
          names: list[str] = ()) -> tuple[torch.Tensor, dict[str, tuple[int, ...]]]:
    """Run one all-zero batch; return the output and the shapes of the named modules' outputs.

    Runs the model as it is (no train/eval switch); callers pass an eval-mode model or a copy."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.zeros(PROBE_BATCH, *input_shape, device=device)
    with capture_features(model, list(names)) as feats:
        out = model(x)
    return out, {n: tuple(f.shape) for n, f in feats.items()}


def module_problem(model: nn.Module, name: str, who: str) -> str | None:
    """'student has no module ...' with a close match, or None if ``name`` exists."""
    names = [n for n, _ in model.named_modules() if n]
    if name in names:
        return None
    top = sorted({n.split(".")[0] for n in names})
    hint = suggest(name, names) or f" (top-level modules: {', '.join(top[:12])})"
    return f"the {who} has no module {name!r}{hint}"
