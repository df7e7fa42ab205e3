"""A model as a ``.cpz`` holding its ONNX graph: the deployable that needs neither torch nor
compresspipe (read it with :mod:`compresspipe.formats.cpz_onnx_reader`, numpy + onnxruntime).

The fp32 model is exported to ONNX; every initializer is then stored as a coded tensor of the
.cpz and marked as external data in the graph (the "skeleton", zlib-compressed, stored as a
uint8 tensor). An initializer whose values all lie in the codebook of the clustered weight of the
same name is stored as Huffman-coded cluster indices with that codebook (pruned weights as sparse
positions); a 1-D tensor the ``huffman`` stage chose to store as float16 or a small codebook is
stored the same way here; other float tensors losslessly. Integer and tiny initializers (axes,
shapes, scalars) stay inside the skeleton: onnxruntime needs them to infer shapes, before
external data is attached. Metadata ``onnx_runtime``: ``{"graph":
skeleton tensor name, "float32": names stored as float16 that the graph reads as float32}``.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..compress.quant.onnx_int8 import onnx_program
from ..core import artifact_keys
from ..core.artifact import Artifact
from . import TensorEncoding, encode_clustered, encode_raw, write_cpz
from .cpz_onnx_reader import ONNX_KEY
from .vectors import FP16, LABELS, encode_vector

GRAPH = "onnx-graph"
ONNX_CPZ_FILE = "model.onnx.cpz"
INLINE_MAX = 16  # initializers this small (or integer) stay in the skeleton


def _indices(values: np.ndarray, book: np.ndarray, zero_index: int | None) -> np.ndarray | None:
    """Cluster indices with ``book[indices] == values`` exactly; None if a value is not in it."""
    order = np.argsort(book, kind="stable")
    pos = np.clip(np.searchsorted(book[order], values), 0, book.size - 1)
    idx = order[pos]
    if zero_index is not None:
        idx = np.where(values == 0, zero_index, idx)
    if not np.array_equal(book[idx], values):
        return None
    return idx.astype(np.uint8 if book.size <= 256 else np.uint16)


def _external(init) -> None:
    """Drop an initializer's data and mark it as external: the reader supplies it."""
    from onnx import TensorProto  # lazy: onnx loads only where ONNX files are written

    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                  "uint64_data", "string_data", "external_data"):
        init.ClearField(field)
    init.data_location = TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", "cpz"


def onnx_cpz_tensors(artifact: Artifact, onnx_path: Path,
                     vectors: Mapping[str, str] | None = None
                     ) -> tuple[dict[str, TensorEncoding], dict]:
    """The coded initializers and skeleton of an exported ONNX file, and the metadata."""
    import onnx  # lazy: onnx loads only where ONNX files are written
    from onnx import numpy_helper

    proto = onnx.load_model(str(onnx_path))
    books = {}
    for name, info in artifact_keys.cluster_layers(artifact).items():
        _, book = (t.numpy() for t in artifact_keys.cluster_tensors(artifact.extras, name))
        books[name] = (book.astype(np.float32).reshape(-1), info.get("zero_index"))
    state = artifact.model.state_dict()
    vectors = vectors or {}
    tensors, how, cast = {}, {}, []
    for init in proto.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype.kind in "iub" or array.size <= INLINE_MAX:
            continue  # axes, shapes, scalars: onnxruntime reads them when it loads the graph
        enc = None
        if init.name in books and array.dtype == np.float32:
            idx = _indices(array, *books[init.name])
            if idx is not None:
                enc = encode_clustered(idx, books[init.name][0], zero_index=books[init.name][1])
                how[init.name] = "clustered"
        own = state.get(init.name)
        if (enc is None and init.name in vectors and own is not None
                and np.array_equal(own.detach().cpu().numpy(), array)):
            enc = encode_vector(array, vectors[init.name])[1]
            how[init.name] = LABELS[vectors[init.name]]
            if vectors[init.name] == FP16:
                cast.append(init.name)
        if enc is None and array.dtype == np.float32 and np.all(array == array.flat[0]):
            # e.g. the statistics of a folded BatchNorm: one value, a one-entry codebook
            enc = encode_clustered(np.zeros(array.shape, np.uint8), array.flat[:1], zero_index=None)
            how[init.name] = "constant"
        if enc is None:
            enc = encode_raw(array)
            how[init.name] = f"raw {array.dtype}"
        tensors[init.name] = enc
        _external(init)
    graph = GRAPH
    while graph in tensors:
        graph += "_"
    tensors[graph] = encode_raw(np.frombuffer(zlib.compress(proto.SerializeToString(), 9),
                                              np.uint8))
    return tensors, {ONNX_KEY: {"graph": graph, "float32": cast}, "encoding": how}


def export_unfused(model: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export without the ONNX optimizer: it would fold BatchNorm into the convolutions, scaling
    each output channel of a clustered weight so that its values leave the codebook; unoptimized,
    initializers keep their parameter names and values."""
    import onnx  # lazy: onnx loads only where ONNX files are written

    program = onnx_program(model.eval(), example, optimize=False)
    onnx.save_model(program.model_proto, str(path))
    return path


def write_onnx_cpz(artifact: Artifact, example: torch.Tensor, path: str | os.PathLike,
                   vectors: Mapping[str, str] | None = None) -> int:
    """Export the artifact's model to ONNX and write it as a .cpz; return the file's size."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_unfused(artifact.model, example, Path(tmp) / "model.onnx")
        tensors, metadata = onnx_cpz_tensors(artifact, onnx_path, vectors)
    return write_cpz(path, tensors, metadata)
