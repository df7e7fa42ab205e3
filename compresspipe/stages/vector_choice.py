"""Choosing how the ``huffman`` stage stores 1-D float tensors: the coarsest coding that leaves the
model's accuracy unchanged.

Candidates come from :mod:`compresspipe.formats.vectors` (per-tensor codebooks of 4 to 8 bits,
then float16). Every level is applied to all vectors at once and the model evaluated on the
decision data: the validation split, never the test set. The coarsest level whose top-1 is not lower and
whose loss is not higher (by more than :data:`LOSS_TOLERANCE`) and whose predictions differ from
the reference model's on at most :data:`MAX_FLIPS` of the samples wins. If none does, the same
test decides tensor by tensor (largest first, each the coarsest coding that passes with those
already chosen); a tensor no coding passes for stays float32.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core import artifact_keys
from ..core.artifact import Artifact
from ..core.data import Loader
from ..core.measure import evaluate
from ..formats.vectors import LEVELS, LOSSLESS, assignment, is_vector, vector_options
from .context import StageContext

LOSS_TOLERANCE = 1e-3  # relative: float16 rounding moves the loss in its 4th digit
MAX_FLIPS = 0.002  # top-1 alone can hide changed predictions that cancel out


def decision_loader(ctx: StageContext) -> Loader:
    """The validation split: what decides how 1-D tensors are stored (never the test set)."""
    return ctx.data.val_loader(purpose="choosing how the huffman stage stores 1-D tensors")


def _evaluate(model: torch.nn.Module, loader: Loader, ctx: StageContext) -> dict:
    predictions: list[torch.Tensor] = []
    out = evaluate(model, loader, ctx.device, predictions)
    return {**out, "predictions": torch.cat(predictions)}


def _flips(got: dict, reference: dict) -> float:
    """The fraction of samples whose prediction changed."""
    return (got["predictions"] != reference["predictions"]).float().mean().item()


def _unchanged(got: dict, reference: dict) -> bool:
    """Top-1 not lower, loss not higher (within tolerance), few predictions changed."""
    return (got["top1"] >= reference["top1"] and _flips(got, reference) <= MAX_FLIPS
            and got["loss"] <= reference["loss"] * (1 + LOSS_TOLERANCE))


def _greedy(state: dict, options: dict, originals: dict, model: torch.nn.Module, loader: Loader,
            reference: dict, ctx: StageContext) -> dict[str, str]:
    """Per tensor, largest first, the coarsest coding that keeps the model (with the tensors
    already coarsened) unchanged; a tensor no coding keeps unchanged stays float32. For when no
    level passes for all tensors at once: one near-tie sample of a small validation split can
    refuse float16 for every vector although most of them change nothing."""
    chosen: dict[str, str] = {}
    evaluations = 0
    for name in sorted(options, key=lambda n: -originals[n].numel()):
        tried: set[str] = set()
        for level in LEVELS:
            how = assignment({name: options[name]}, level)[name]
            if how in tried:
                continue
            tried.add(how)
            state[name].copy_(torch.from_numpy(np.asarray(options[name][how][0])))
            evaluations += 1
            if _unchanged(_evaluate(model, loader, ctx), reference):
                chosen[name] = how
                break
        else:
            state[name].copy_(originals[name])
    ctx.log_metrics({"vectors_greedy_evaluations": evaluations}, None)
    return chosen


def choose_vectors(artifact: Artifact, ctx: StageContext, mode: str, omitted: set[str]
                   ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(per tensor: ``fp16``/``cbN``/``fp32``, per tensor: the values the file will decode to)
    for the 1-D float32 tensors of the model that are neither clustered nor ``omitted`` (the
    statistics of folded BatchNorms, which the file does not store) and not pruned: a codebook
    need not hold an exact zero, and a pruned entry must decode to zero. ``auto`` tries each
    level for all tensors at once, coarsest first; when none passes, :func:`_greedy` decides
    per tensor."""
    if mode == "float32":
        return {}, {}
    clustered = set(artifact_keys.cluster_layers(artifact)) | omitted | set(artifact.masks)
    state = artifact.model.state_dict()
    names = [n for n, v in state.items()
             if n not in clustered and is_vector(v.detach().cpu().numpy())]
    options = {n: vector_options(state[n].detach().cpu().numpy()) for n in names}
    levels = ["fp16"] if mode == "float16" else list(LEVELS)
    loader = decision_loader(ctx) if mode == "auto" else None
    reference = _evaluate(artifact.model, loader, ctx) if loader is not None else None
    originals = {n: state[n].detach().clone() for n in names}
    chosen: dict[str, str] = {}
    try:
        for level in levels:
            pick = assignment(options, level)
            for n, how in pick.items():
                state[n].copy_(torch.from_numpy(np.asarray(options[n][how][0])))
            if reference is None:
                chosen = pick
                break
            got = _evaluate(artifact.model, loader, ctx)
            ctx.log_metrics({f"vectors_{level}_decision_top1": got["top1"],
                             f"vectors_{level}_decision_loss": got["loss"],
                             f"vectors_{level}_decision_flips": _flips(got, reference)}, None)
            if _unchanged(got, reference):
                chosen = pick
                break
        else:  # only with a reference: without one the first level is taken
            for n, value in originals.items():
                state[n].copy_(value)
            chosen = _greedy(state, options, originals, artifact.model, loader, reference, ctx)
    finally:
        for n, value in originals.items():
            state[n].copy_(value)
    expected = {n: torch.from_numpy(np.array(options[n][how][0], copy=True))
                for n, how in chosen.items()}
    counts = {lv: sum(h == lv for h in chosen.values()) for lv in LEVELS}
    counts[LOSSLESS] = len(names) - len(chosen)
    ctx.log_metrics({"vectors_considered": len(names),
                     **{f"vectors_{lv}": c for lv, c in counts.items()},
                     **({"vectors_decision_top1": reference["top1"],
                         "vectors_decision_loss": reference["loss"]} if reference else {})}, None)
    return chosen, expected
