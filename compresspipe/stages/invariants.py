"""What must hold after any stage, checked by the runner for every stage whatever its type:
weight sharing whose weights a stage changed is dropped (stale codebooks would make the huffman
stage code a model that is not the one evaluated), and pruning masks survive unless the stage
declares that it releases them (a distill stage with a new student network)."""

from __future__ import annotations

import torch

from ..compress.quant.cluster import drop_stale
from ..core.artifact import Artifact
from ..core.errors import CompressPipeError
from .base import Stage
from .registry import register_invariant


@register_invariant
def stale_codebooks_dropped(stage: Stage, masks_before: dict[str, torch.Tensor],
                            artifact: Artifact) -> None:
    stale = drop_stale(artifact)
    if stale:
        print(f"   weight sharing of {len(stale)} tensor(s) dropped: stage {stage.name!r} "
              f"changed them (e.g. {stale[0]}); run cluster again to re-share", flush=True)


@register_invariant
def masks_kept(stage: Stage, masks_before: dict[str, torch.Tensor], artifact: Artifact) -> None:
    missing = set(masks_before) - set(artifact.masks)
    if missing and not stage.releases_masks():
        raise CompressPipeError(f"stage {stage.name!r} dropped the pruning masks of "
                                f"{sorted(missing)[:3]}")
