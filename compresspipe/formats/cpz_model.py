"""Torch glue for the .cpz container: a model's state to coded tensors and back.

The container itself (compresspipe.formats) knows nothing of torch; this module decides how each
tensor is coded: weights clustered by the ``cluster`` stage as Huffman-coded indices into their
codebook (pruned weights as sparse positions), everything else raw.

An int8 model (the ONNX file of ``ptq``/``qat``) is stored as its int8 weights (Huffman-coded,
entries equal to the zero point as sparse positions), its other initializers raw and the rest of
the ModelProto, zlib-compressed, as one uint8 tensor; decoding rebuilds the ONNX file byte for
byte.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..compress.quant.batchnorm import STATISTICS, foldable, folded_statistics
from ..compress.quant.onnx_int8 import (
    OnnxModel,
    fill_initializers,
    int8_weight_params,
    missing_initializers,
    split_initializers,
)
from ..core import artifact_keys
from ..core.artifact import Artifact, register_deploy_format
from ..core.errors import ArtifactError
from ..core.models import build_from_saved_spec
from . import (
    CpzFormatError,
    Int8Tensor,
    RawTensor,
    encode_clustered,
    encode_int8,
    encode_raw,
    read_cpz,
    write_cpz,
)
from .vectors import LABELS, encode_vector

CPZ_FILE = "model.cpz"
ONNX_KEY = "onnx"  # metadata: {"graph": skeleton tensor name, "file": the ONNX file's name}
MAX_GRAPH_BYTES = 1 << 28  # a hostile skeleton must not inflate without bound


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
    return {f"{bn}.{stat}" for bn in bn_folded for stat in STATISTICS}


def encode_state(artifact: Artifact, float_dtype: str = "float32",
                 bn_folded: list[str] = (),
                 vectors: Mapping[str, str] | None = None) -> tuple[dict, dict[str, str]]:
    """Coded tensors for every entry of the model's state, and how each was coded.

    The statistics of the BatchNorms in ``bn_folded`` (see compresspipe.compress.quant.batchnorm) are left
    out: the decoder recreates them. ``vectors`` names 1-D tensors stored as float16 or a small
    codebook (compresspipe.formats.vectors: ``fp16``, ``cb4`` ...); the caller checked that the
    model's accuracy allows it."""
    vectors = vectors or {}
    layers = artifact_keys.cluster_layers(artifact)
    omitted = _statistics_names(list(bn_folded))
    tensors, how = {}, {}
    for name, value in artifact.model.state_dict().items():
        if name in omitted:
            continue
        if name in layers:
            info = layers[name]
            indices, codebook = (t.numpy() for t in artifact_keys.cluster_tensors(artifact.extras,
                                                                                   name))
            tensors[name] = encode_clustered(indices, codebook, tuple(value.shape),
                                             zero_index=info.get("zero_index"))
            how[name] = f"clustered {info['bits']}-bit"
        elif name in vectors:
            tensors[name] = encode_vector(value.detach().cpu().numpy(), vectors[name])[1]
            how[name] = LABELS[vectors[name]]
        else:
            array = value.detach().cpu().numpy()
            if array.dtype == np.float32 and float_dtype == "float16":
                array = array.astype(np.float16)
            tensors[name] = encode_raw(array)
            how[name] = f"raw {array.dtype}"
    return tensors, how


def write_model_cpz(artifact: Artifact, path: str | os.PathLike, float_dtype: str = "float32",
                    bn_folded: list[str] = (), vectors: Mapping[str, str] | None = None,
                    lineage: str = "full") -> int:
    """Write the artifact's model as a .cpz file; return its size in bytes.

    ``bn_folded`` names BatchNorms already folded with compresspipe.compress.quant.batchnorm.fold_statistics;
    ``vectors`` as for :func:`encode_state`; ``lineage`` as for :func:`file_lineage`."""
    tensors, how = encode_state(artifact, float_dtype, bn_folded, vectors)
    return write_cpz(path, tensors, model_metadata(artifact, how, bn_folded, lineage))


def model_metadata(artifact: Artifact, how: dict[str, str], bn_folded: list[str],
                   lineage: str = "full") -> dict:
    """The metadata of a model's .cpz: spec, lineage, masks, per-tensor coding, folded BNs."""
    return _json_safe({"spec": artifact.spec, "lineage": file_lineage(artifact.lineage, lineage),
                       "masks": sorted(artifact.masks), "encoding": how,
                       "bn_folded": sorted(bn_folded)})


LINEAGE_DETAIL = ("full", "metrics", "none")


def file_lineage(lineage: list[dict[str, Any]], detail: str = "full") -> list[dict[str, Any]]:
    """What a file keeps of how its model was made: every stage's name, type, config and metrics
    (``full``), the same without configs (``metrics``), or nothing (``none``): decoding needs
    none of it, and a small model's file can spend 4% of its bytes on it."""
    if detail not in LINEAGE_DETAIL:
        raise ValueError(f"lineage detail {detail!r}: expected one of {LINEAGE_DETAIL}")
    if detail == "none":
        return []
    stable = _stable_lineage(lineage)
    if detail == "metrics":
        return [{k: v for k, v in e.items() if k != "config"} if isinstance(e, dict) else e
                for e in stable]
    return stable


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


def _read(path: str | os.PathLike) -> tuple[dict, dict]:
    try:
        tensors, metadata = read_cpz(path)
    except CpzFormatError as exc:
        raise ArtifactError(f"{path}: {exc}") from exc
    if not isinstance(metadata.get("spec"), dict):
        raise ArtifactError(f"{path}: metadata has no model spec")
    return tensors, metadata


def read_model_cpz(path: str | os.PathLike) -> Artifact:
    """Decode a .cpz into a runnable model (rebuilt from its spec, or for int8 content the
    ONNX model run by onnxruntime; nothing unpickled)."""
    tensors, metadata = _read(path)
    lineage = metadata.get("lineage")
    lineage = lineage if isinstance(lineage, list) else []
    if ONNX_KEY in metadata:
        model = _onnx_model(path, _rebuild_onnx(path, tensors, metadata))
        return Artifact(model=model.eval(), spec=metadata["spec"], lineage=lineage)
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
    return Artifact(model=model.eval(), spec=metadata["spec"], lineage=lineage)


# -- int8 ONNX models ------------------------------------------------------------------------


def write_int8_cpz(artifact: Artifact, onnx_path: str | os.PathLike,
                   path: str | os.PathLike, lineage: str = "full") -> int:
    """Write the int8 ONNX model ``onnx_path`` (the deployed form of ``artifact``) as a .cpz;
    return its size in bytes. ``lineage`` as for :func:`file_lineage`."""
    import onnx  # lazy: onnx loads only where ONNX files are written or read


    proto = onnx.load_model_from_string(Path(onnx_path).read_bytes())
    params = int8_weight_params(proto)  # reads scales and zero points: before the split
    arrays = split_initializers(proto)
    tensors, how = {}, {}
    for name, array in arrays.items():
        if name in params and array.dtype == np.int8:
            scale, zero_point, axis = params[name]
            try:
                tensors[name] = encode_int8(array, scale, zero_point, axis)
                how[name] = "int8" + (" per-channel" if axis is not None else "")
                continue
            except ValueError:  # e.g. blocked scales: still lossless, zeros coded as values
                pass
        tensors[name] = encode_raw(array)
        how[name] = f"raw {array.dtype.name}"
    graph = "onnx-graph"
    while graph in tensors:  # initializer names are free text: never collide with one
        graph += "_"
    # names and attributes compress ~7x with zlib, the bulk of a small model's skeleton
    skeleton = zlib.compress(proto.SerializeToString(), 9)
    tensors[graph] = encode_raw(np.frombuffer(skeleton, np.uint8))
    metadata = _json_safe({"spec": artifact.spec, "lineage": file_lineage(artifact.lineage, lineage),
                           "masks": sorted(artifact.masks), "encoding": how,
                           ONNX_KEY: {"graph": graph, "file": Path(onnx_path).name}})
    return write_cpz(path, tensors, metadata)


def read_onnx_cpz(path: str | os.PathLike) -> tuple[bytes, str] | None:
    """(the ONNX model's bytes, its original file name) of an int8 .cpz; None when the file
    holds a torch model's state instead."""
    tensors, metadata = _read(path)
    if ONNX_KEY not in metadata:
        return None
    return _rebuild_onnx(path, tensors, metadata), metadata[ONNX_KEY]["file"]


def _rebuild_onnx(path, tensors: dict, metadata: dict) -> bytes:
    """The ONNX model bytes: the skeleton with every split-off initializer put back, checked
    name by name, type and shape against the skeleton."""
    import onnx  # lazy: onnx loads only where ONNX files are written or read
    from google.protobuf.message import DecodeError


    info = metadata[ONNX_KEY]
    if not (isinstance(info, dict) and isinstance(info.get("graph"), str)
            and isinstance(info.get("file"), str) and info["file"].endswith(".onnx")
            and Path(info["file"]).name == info["file"]):
        raise ArtifactError(f"{path}: metadata {ONNX_KEY!r} must be {{'graph': tensor name, "
                            "'file': a plain .onnx file name}")
    graph = tensors.get(info["graph"])
    if not (isinstance(graph, RawTensor) and graph.array.dtype == np.uint8
            and graph.array.ndim == 1):
        raise ArtifactError(f"{path}: the ONNX graph tensor {info['graph'][:80]!r} is missing or "
                            "not a 1-D uint8 tensor")
    proto = onnx.ModelProto()
    try:
        inflate = zlib.decompressobj()
        skeleton = inflate.decompress(graph.array.tobytes(), MAX_GRAPH_BYTES)
        if not inflate.eof or inflate.unconsumed_tail:
            raise ValueError(f"not a complete zlib stream of at most {MAX_GRAPH_BYTES} bytes")
        proto.ParseFromString(skeleton)
    except (zlib.error, DecodeError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: tensor {info['graph'][:80]!r} does not parse as an ONNX "
                            f"model ({exc})") from exc
    missing = missing_initializers(proto)
    stored = set(tensors) - {info["graph"]}
    for name in sorted(stored ^ set(missing)):
        where = ("is not an initializer without data in the ONNX graph" if name in stored
                 else "is missing from the file")
        raise ArtifactError(f"{path}: tensor {name[:80]!r} {where}")
    arrays = {}
    for name, coded in tensors.items():
        if name == info["graph"]:
            continue
        dtype, shape = missing[name]
        if isinstance(coded, Int8Tensor):
            array = coded.q
        elif isinstance(coded, RawTensor):
            array = coded.array
        else:
            raise ArtifactError(f"{path}: tensor {name[:80]!r} is {type(coded).__name__}; an "
                                "ONNX initializer is stored int8 or raw")
        if array.dtype.newbyteorder("<") != dtype or tuple(array.shape) != shape:
            raise ArtifactError(f"{path}: tensor {name[:80]!r} is {array.dtype} "
                                f"{list(array.shape)}, the ONNX graph expects {dtype} "
                                f"{list(shape)}")
        arrays[name] = array
    fill_initializers(proto, arrays)
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ArtifactError(f"{path}: the decoded ONNX model is invalid: "
                            f"{str(exc).splitlines()[0][:200]}") from exc
    return proto.SerializeToString()


def _onnx_model(path, data: bytes) -> nn.Module:
    try:
        return OnnxModel(data)
    except Exception as exc:  # onnxruntime's own exception types: its message is what helps
        raise ArtifactError(f"{path}: onnxruntime cannot load the decoded ONNX model: "
                            f"{str(exc).splitlines()[0][:200]}") from exc


@register_deploy_format("cpz")
def _load_deployed(directory: Path, artifact: Artifact) -> nn.Module:
    return read_model_cpz(directory / CPZ_FILE).model
