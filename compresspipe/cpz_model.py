"""Torch glue for the .cpz container: a model's state to coded tensors and back.

The container itself (compresspipe.coding) knows nothing of torch; this module decides how each
tensor is coded: weights clustered by the ``cluster`` stage as Huffman-coded indices into their
codebook (pruned weights as sparse positions), everything else raw.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .artifact import Artifact, register_deploy_format
from .errors import ArtifactError

CPZ_FILE = "model.cpz"
CLUSTER_PREFIX = "cluster."


def _json_safe(value: Any) -> Any:
    """The container's metadata is strict JSON: NaN and infinities become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _statistics_names(bn_folded: list[str]) -> set[str]:
    from .batchnorm import STATISTICS

    return {f"{bn}.{stat}" for bn in bn_folded for stat in STATISTICS}


def encode_state(artifact: Artifact, float_dtype: str = "float32",
                 bn_folded: list[str] = ()) -> tuple[dict, dict[str, str]]:
    """Coded tensors for every entry of the model's state, and how each was coded.

    The statistics of the BatchNorms in ``bn_folded`` (see compresspipe.batchnorm) are left
    out: the decoder recreates them."""
    from .coding import encode_clustered, encode_raw

    layers = artifact.quant.get("cluster", {}).get("layers", {})
    omitted = _statistics_names(list(bn_folded))
    tensors, how = {}, {}
    for name, value in artifact.model.state_dict().items():
        if name in omitted:
            continue
        if name in layers:
            info = layers[name]
            indices = artifact.extras[f"{CLUSTER_PREFIX}{name}.indices"].numpy()
            codebook = artifact.extras[f"{CLUSTER_PREFIX}{name}.codebook"].numpy()
            tensors[name] = encode_clustered(indices, codebook, tuple(value.shape),
                                             zero_index=info.get("zero_index"))
            how[name] = f"clustered {info['bits']}-bit"
        else:
            array = value.detach().cpu().numpy()
            if array.dtype == np.float32 and float_dtype == "float16":
                array = array.astype(np.float16)
            tensors[name] = encode_raw(array)
            how[name] = f"raw {array.dtype}"
    return tensors, how


def write_model_cpz(artifact: Artifact, path: str | os.PathLike, float_dtype: str = "float32",
                    bn_folded: list[str] = ()) -> int:
    """Write the artifact's model as a .cpz file; return its size in bytes.

    ``bn_folded`` names BatchNorms already folded with compresspipe.batchnorm.fold_statistics."""
    from .coding import write_cpz

    tensors, how = encode_state(artifact, float_dtype, bn_folded)
    metadata = _json_safe({"spec": artifact.spec, "lineage": _stable_lineage(artifact.lineage),
                           "masks": sorted(artifact.masks), "encoding": how,
                           "bn_folded": sorted(bn_folded)})
    return write_cpz(path, tensors, metadata)


def _stable_lineage(lineage: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lineage without wall-clock numbers (timings, and artifact sizes that embed them), so
    the same model always makes the same file: model_bytes must not depend on machine load."""
    def volatile(key: str) -> bool:
        return key == "artifact_bytes" or key.endswith(("_s", "_ms")) or "latency" in key

    out = []
    for entry in lineage:
        if isinstance(entry, dict) and isinstance(entry.get("metrics"), dict):
            entry = {**entry, "metrics": {k: v for k, v in entry["metrics"].items()
                                          if not volatile(k)}}
        out.append(entry)
    return out


def _folded_statistics(path, model: nn.Module, names: object) -> dict[str, torch.Tensor]:
    """The statistics tensors of the BatchNorms the file says were folded, checked by name."""
    from .batchnorm import foldable, folded_statistics

    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ArtifactError(f"{path}: metadata 'bn_folded' must be a list of module names")
    modules = dict(model.named_modules())
    state = {}
    for name in names:
        if not foldable(modules.get(name)):
            raise ArtifactError(f"{path}: metadata 'bn_folded' names {name[:80]!r}, which is "
                                "not a BatchNorm of the model")
        state.update({f"{name}.{k}": v for k, v in folded_statistics(modules[name]).items()})
    return state


def _stored_elements(coded: Any) -> int:
    """Elements of a decoded tensor (clustered, int8 or raw), without densifying it."""
    for attr in ("indices", "q", "array"):
        if hasattr(coded, attr):
            return int(getattr(coded, attr).size)
    return 0


def read_model_cpz(path: str | os.PathLike) -> Artifact:
    """Decode a .cpz into a runnable model (rebuilt from its spec; nothing unpickled)."""
    from .coding import CpzFormatError, read_cpz
    from .models import build_from_saved_spec

    try:
        tensors, metadata = read_cpz(path)
    except CpzFormatError as exc:
        raise ArtifactError(f"{path}: {exc}") from exc
    if not isinstance(metadata.get("spec"), dict):
        raise ArtifactError(f"{path}: metadata has no model spec")
    elements = sum(_stored_elements(t) for t in tensors.values())
    model = build_from_saved_spec(metadata["spec"], str(path), file_elements=elements)
    own = model.state_dict()
    folded = _folded_statistics(path, model, metadata.get("bn_folded", []))
    missing = sorted(set(own) - set(tensors) - set(folded))
    extra = sorted((set(tensors) - set(own)) | (set(tensors) & set(folded)))
    if missing or extra:
        raise ArtifactError(f"{path}: tensors do not match the model (missing {missing[:3]}, "
                            f"unexpected {extra[:3]})")
    state = {}
    for name, coded in tensors.items():
        dense = torch.from_numpy(np.array(coded.to_dense(), copy=True))  # keeps 0-d shapes
        if tuple(dense.shape) != tuple(own[name].shape):
            raise ArtifactError(f"{path}: tensor {name!r} has shape {list(dense.shape)}, "
                                f"the model expects {list(own[name].shape)}")
        state[name] = dense.to(own[name].dtype)
    model.load_state_dict({**state, **folded})
    lineage = metadata.get("lineage")
    return Artifact(model=model.eval(), spec=metadata["spec"],
                    lineage=lineage if isinstance(lineage, list) else [])


@register_deploy_format("cpz")
def _load_deployed(directory: Path, artifact: Artifact) -> nn.Module:
    return read_model_cpz(directory / CPZ_FILE).model
