"""Everything stages exchange through an artifact besides weights and masks, one typed accessor
each: the key strings live here and nowhere else.

``artifact.meta`` (JSON in artifact.json):
    training    the dense training a stage ran (its loop settings, steps per epoch) — pruning
                methods read it to rebuild the original LR schedule (ALLR, rewinding);
    rewind      the step and stage of the recorded rewind point;
    pruning     the last prune stage's method, criterion, scope, granularity and target;
    structured  per structured stage: its widths, MACs and latency record;
    distill     the last distill stage's teacher and accuracies;
    sensitivity the last sensitivity stage's per-layer scan (compress/sensitivity.py).
``artifact.extras`` (tensors in extras.safetensors):
    rewind/<state key>          the model state at the rewind point;
    cluster.<param>.indices     the codebook index of every weight of a shared layer;
    cluster.<param>.codebook    its centroids.
``artifact.quant`` (JSON): ``cluster`` (the shared layers) and ``int8`` (the int8 scheme).

These names are part of the on-disk artifact format: changing one breaks saved artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .artifact import Artifact

TRAINING = "training"
REWIND = "rewind"
PRUNING = "pruning"
STRUCTURED = "structured"
DISTILL = "distill"
SENSITIVITY = "sensitivity"
CLUSTER = "cluster"
INT8 = "int8"
REWIND_PREFIX = "rewind/"
CLUSTER_PREFIX = "cluster."
CLUSTER_PARTS = ("indices", "codebook")


def buffer_name(key: str) -> str:
    """A parameter or state key as a module buffer name (buffers cannot contain dots): hooks
    keep such state in buffers so that the loop's epoch checkpoints carry it."""
    return key.replace(".", "__")


# -- dense training and rewind points ---------------------------------------------------------


@dataclass(frozen=True)
class TrainingRecord:
    config: dict[str, Any]  # the TrainConfig, as JSON
    steps_per_epoch: int


def set_training(artifact: Artifact, config: dict[str, Any], steps_per_epoch: int) -> None:
    artifact.meta[TRAINING] = {"config": config, "steps_per_epoch": steps_per_epoch}


def training(artifact: Artifact) -> TrainingRecord | None:
    info = artifact.meta.get(TRAINING)
    return TrainingRecord(info["config"], info["steps_per_epoch"]) if info else None


def set_rewind_point(artifact: Artifact, state: dict[str, torch.Tensor], step: int,
                     stage: str) -> None:
    artifact.extras.update({REWIND_PREFIX + k: v for k, v in state.items()})
    artifact.meta[REWIND] = {"step": step, "stage": stage}


def rewind_state(artifact: Artifact) -> dict[str, torch.Tensor]:
    """The recorded model state ({} when no stage recorded one)."""
    return {k[len(REWIND_PREFIX):]: v for k, v in artifact.extras.items()
            if k.startswith(REWIND_PREFIX)}


def rewind_step(artifact: Artifact) -> int:
    return int(artifact.meta.get(REWIND, {}).get("step", 0))


# -- records of what a stage did --------------------------------------------------------------


def set_pruning(artifact: Artifact, record: dict[str, Any]) -> None:
    artifact.meta[PRUNING] = record


def add_structured(artifact: Artifact, stage: str, record: dict[str, Any]) -> None:
    artifact.meta.setdefault(STRUCTURED, {})[stage] = record


def set_distill(artifact: Artifact, record: dict[str, Any]) -> None:
    artifact.meta[DISTILL] = record


def set_sensitivity(artifact: Artifact, record: dict[str, Any]) -> None:
    artifact.meta[SENSITIVITY] = record


def sensitivity(artifact: Artifact) -> dict[str, Any] | None:
    """The per-layer sensitivity scan the artifact carries (None when no stage measured one)."""
    return artifact.meta.get(SENSITIVITY)


# -- weight sharing (cluster) and int8 --------------------------------------------------------


def cluster_key(name: str, part: str) -> str:
    """The extras key of a shared layer's ``part`` ('indices' or 'codebook')."""
    return f"{CLUSTER_PREFIX}{name}.{part}"


def cluster_info(artifact: Artifact) -> dict[str, Any] | None:
    """The weight-sharing record ({'layers': {param: {bits, shape, ...}}, ...}) or None."""
    return artifact.quant.get(CLUSTER)


def cluster_layers(artifact: Artifact) -> dict[str, dict[str, Any]]:
    """{param name: its description} of every shared layer ({} when nothing is shared)."""
    return artifact.quant.get(CLUSTER, {}).get("layers", {})


def set_cluster(artifact: Artifact, info: dict[str, Any],
                tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replace the weight-sharing record and its (indices, codebook) tensors by layer."""
    for key in [k for k in artifact.extras if k.startswith(CLUSTER_PREFIX)]:
        del artifact.extras[key]
    for name, (indices, codebook) in tensors.items():
        artifact.extras[cluster_key(name, "indices")] = indices
        artifact.extras[cluster_key(name, "codebook")] = codebook
    artifact.quant[CLUSTER] = info


def cluster_tensors(extras: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, codebook) of shared layer ``name``; KeyError naming the missing key."""
    return extras[cluster_key(name, "indices")], extras[cluster_key(name, "codebook")]


def drop_cluster_layer(artifact: Artifact, name: str) -> None:
    """Forget that ``name`` is shared (its record and tensors); the record goes with its last
    layer."""
    info = artifact.quant[CLUSTER]
    del info["layers"][name]
    for part in CLUSTER_PARTS:
        artifact.extras.pop(cluster_key(name, part), None)
    if not info["layers"]:
        del artifact.quant[CLUSTER]


def set_int8(artifact: Artifact, record: dict[str, Any]) -> None:
    artifact.quant[INT8] = record
