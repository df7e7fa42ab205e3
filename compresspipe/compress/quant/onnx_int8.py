"""The deployable int8 model: one ONNX file run by onnxruntime.

Why ONNX + onnxruntime rather than a ``torch.export`` program:

* **fast on CPU** — onnxruntime fuses the QDQ graph into real int8 kernels (QLinearConv,
  QGemm, QLinearAdd; VNNI where the CPU has it). A converted PT2E program run eagerly
  computes every op in fp32 between dequantize and quantize, slower than fp32; it is fast only
  after ``torch.compile`` (Inductor), which needs a C++ toolchain and minutes on the consumer;
* **reloads without compresspipe and without pickle** — an ``.onnx`` file is a protobuf, read
  by ``onnxruntime.InferenceSession(path)`` in any process (``torch.export.load`` goes through
  torch's serialization instead, and needs torch on the consumer);
* **self-describing** — int8 weight initializers are renamed after the parameter they come from
  (``layer1.0.conv1.weight``), so the pruning masks can be checked on the deployed file itself.

Static int8 (QAT or PTQ) is torchao's converted QDQ graph exported with ``torch.onnx``;
dynamic int8 is onnxruntime's own ``quantize_dynamic`` applied to the fp32 export.
"""

from __future__ import annotations

import ast
import contextlib
import io
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...core.artifact import Artifact, register_deploy_format
from ...core.errors import CompressPipeError, MaskViolation, onnx_export_failed
from .conv_taps import apply_window, recorded_windows, trim_padding_taps

DEPLOY_FORMAT = "onnx-int8"
INT8_FILE = "model.int8.onnx"
INPUT_NAME, OUTPUT_NAME = "input", "logits"
WEIGHTED_OPS = ("Conv", "Gemm", "MatMul", "ConvInteger", "MatMulInteger")
SCOPES_KEY = "pkg.torch.onnx.name_scopes"


# -- export ------------------------------------------------------------------------------------


def onnx_program(module: nn.Module, example: torch.Tensor, **options: Any):
    """``torch.onnx.export`` (dynamo) of ``module`` with a dynamic batch dimension and our
    input/output names; ``options`` go to the exporter. A failure is one ``CompressPipeError``.

    Attention runs on SDPA's math backend while exporting: the graph traced with CPU's fused
    kernel records views whose strides only that kernel produces, and the exporter's
    decomposition (to the same math) then cannot apply them (timm's MaxViT: "Cannot view a
    tensor with shape [32, 4, 2, 32] and strides (256, 32, 128, 1)"). ONNX has no fused
    attention below opset 23, so the file is the same math either way."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        # the exporter narrates its progress on stdout; a pipeline's output stays readable
        with contextlib.redirect_stdout(io.StringIO()), sdpa_kernel(SDPBackend.MATH):
            return torch.onnx.export(
                module.cpu(), (example.cpu(),), dynamo=True, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},), verbose=False,
                **options)
    except Exception as exc:  # the exporter raises many types; its message is what helps
        raise onnx_export_failed(exc) from exc


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path,
                opset: int | None = None, trim_taps: bool = True) -> Path:
    """Export ``module`` (an int8 QDQ graph or an fp32 model) to one self-contained file
    (``opset``: None for the exporter's default; ``trim_taps``: slice convolution taps that
    only read padding at the example's spatial size, see ``compresspipe.compress.quant.conv_taps``)."""
    import onnx  # lazy: onnx loads only where ONNX files are written or read


    proto = onnx_program(module, example, opset_version=opset).model_proto
    name_weights_after_parameters(proto)
    strip_debug_info(proto)
    if trim_taps:
        trim_padding_taps(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))
    return path


def name_weights_after_parameters(proto) -> dict[str, str]:
    """Rename each weight initializer after its parameter; return {old name: new name}.

    The exporter names folded weights ``_frozen_paramN`` or ``val_N``; the node that consumes
    them records its module path (``['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d_1']``).
    The weight is found behind DequantizeLinear and Transpose (linear layers on 3-D inputs
    become MatMul with a transposed weight).
    """
    init = {t.name for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    renames: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        source = _weight_source(node.input[1], producers, init)
        module = _module_path(node)
        # a weight that kept its parameter's name stays: after the exporter folds batch norm
        # into a convolution, the node's scope is the norm's, not the convolution's
        if source is None or module is None or source.endswith(".weight"):
            continue
        new = f"{module}.weight"
        if source != new and new not in init and new not in renames.values():
            renames[source] = new
    for tensor in proto.graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    return renames


def _weight_source(name: str, producers: dict, init: set[str]) -> str | None:
    """The initializer a weight input comes from, through DequantizeLinear/Transpose."""
    for _ in range(3):
        if name in init:
            return name
        node = producers.get(name)
        if node is None or node.op_type not in ("DequantizeLinear", "Transpose"):
            return None
        name = node.input[0]
    return name if name in init else None


def strip_debug_info(proto) -> None:
    """Drop per-node stack traces and FX dumps: a quarter of a small model's file otherwise."""
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def _module_path(node) -> str | None:
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get(SCOPES_KEY, "[]"))
    except (ValueError, SyntaxError):
        return None
    return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None


def quantize_dynamic_onnx(fp32_path: Path, out_path: Path, per_channel: bool) -> Path:
    """onnxruntime's dynamic int8 for MatMul/Gemm: int8 weights, activations quantized at
    run time per batch. Convolutions stay fp32 (dynamic int8 convs are slow on CPU)."""
    # lazy: onnxruntime loads only where an ONNX model runs
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # the pre-processing onnxruntime asks for (shape inference, graph clean-up) before quantizing
    prepped = fp32_path.with_name(fp32_path.stem + ".prepped.onnx")
    quant_pre_process(str(fp32_path), str(prepped))
    quantize_dynamic(prepped, out_path, op_types_to_quantize=["MatMul", "Gemm"],
                     per_channel=per_channel, weight_type=QuantType.QInt8,
                     extra_options={"WeightSymmetric": True})
    return out_path


# -- what is in the file -----------------------------------------------------------------------


def deployed_weights(path: Path | Any) -> dict[str, tuple[np.ndarray, np.ndarray, int | None]]:
    """{parameter name: (stored values, zero point, channel axis or None)} read from the file
    (or from an already parsed ``onnx.ModelProto``).

    int8 weights come with their zero point (see :func:`int8_weight_params`); weights the file
    keeps in float (a dynamic model's convolutions) come with a zero point of 0.
    """
    import onnx  # lazy: onnx loads only where ONNX files are written or read
    from onnx import numpy_helper

    proto = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path))
    init = {t.name: t for t in proto.graph.initializer}
    out: dict[str, tuple[np.ndarray, np.ndarray, int | None]] = {}
    for name, tensor in init.items():
        values = numpy_helper.to_array(tensor)
        if values.dtype.kind == "f" and values.ndim >= 2:
            out[name] = (values, np.zeros((), values.dtype), None)
    for name, (_, zp, axis) in int8_weight_params(proto).items():
        # onnxruntime's dynamic quantization names them <weight>[_Transposed]_quantized
        param = name.removesuffix("_quantized").removesuffix("_Transposed")
        out[param] = (numpy_helper.to_array(init[name]), zp, axis)
    return out


def check_int8_masks(path: Path | Any, masks: dict[str, torch.Tensor], stage: str,
                     where: str | None = None) -> list[str]:
    """Raise MaskViolation unless every pruned weight is exactly zero in the deployed file
    (``path``, or a parsed ``onnx.ModelProto`` that ``where`` names in messages).

    A quantized weight q dequantizes to (q - zero_point) * scale, so it is exactly 0.0 iff
    q == zero_point. Returns the masked tensors that are not stored as such in the file (batch
    norm scales folded into convolutions); the runner checks those on model.safetensors.
    """
    import onnx  # lazy: onnx loads only where ONNX files are written or read


    proto = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path))
    weights = deployed_weights(proto)
    trimmed = recorded_windows(proto)
    where = where or Path(path).name
    absent = []
    for name, mask in masks.items():
        if name not in weights:
            absent.append(name)
            continue
        q, zp, axis = weights[name]
        # a trimmed convolution stores only the taps that can read the input
        keep = apply_window(mask.bool().cpu().numpy(), trimmed.get(name))
        if q.shape != keep.shape and q.shape == keep.T.shape:
            q = q.T  # MatMul weights are stored transposed
            axis = None if axis is None else q.ndim - 1 - axis
        if q.shape != keep.shape:
            raise MaskViolation(f"stage {stage!r}: deployed weight {name!r} has shape {q.shape} "
                                f"in {where}, its mask {keep.shape}")
        if axis is not None:
            shape = [1] * q.ndim
            shape[axis] = -1
            zp = zp.reshape(shape)
        zero = np.broadcast_to(zp, q.shape)
        revived = int(np.count_nonzero(q[~keep] != zero[~keep]))
        if revived:
            raise MaskViolation(f"stage {stage!r}: {revived} pruned weights of {name!r} are not "
                                f"zero in the deployed model {where}")
    return absent


def fused_op_counts(path: Path) -> dict[str, int]:
    """Op types after onnxruntime's graph optimisations: shows which ops really run in int8."""
    import onnx  # lazy: onnx loads only where ONNX files are written or read
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        # EXTENDED includes the QDQ fusions; ALL adds hardware-specific layouts that
        # onnxruntime refuses to serialise without a warning
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized)
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return dict(Counter(n.op_type for n in onnx.load(str(optimized)).graph.node))


# -- the graph without its tensors (the .cpz form of an int8 file) ---------------------------

# the element types the .cpz container stores (docs/format.md); others stay in the graph
_SPLIT_TYPES = ("FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32", "INT64", "UINT8",
                "UINT16", "UINT32", "UINT64", "BOOL")
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data",
                 "uint64_data")


def _splittable(tensor) -> np.dtype | None:
    """The little-endian numpy dtype of an initializer whose data can live outside the graph
    (stored inline, of a type the container has, not empty); None otherwise."""
    import onnx  # lazy: onnx loads only where ONNX files are written or read

    if tensor.data_type not in {getattr(onnx.TensorProto, t) for t in _SPLIT_TYPES}:
        return None
    if tensor.data_location == onnx.TensorProto.EXTERNAL or any(
            len(getattr(tensor, f)) for f in _TYPED_FIELDS):
        return None
    if any(d <= 0 for d in tensor.dims):
        return None
    return onnx_dtype(tensor)


def split_initializers(proto) -> dict[str, np.ndarray]:
    """Take the data of the graph's initializers out of ``proto`` (in place): {name: array}.

    What remains is the skeleton; :func:`fill_initializers` puts the arrays back and gives the
    same serialized bytes. Initializers held otherwise (typed fields, external data, empty)
    stay in the skeleton as they are."""
    arrays = {}
    for tensor in proto.graph.initializer:
        dtype = _splittable(tensor)
        if dtype is None or not tensor.HasField("raw_data"):
            continue
        shape = tuple(int(d) for d in tensor.dims)
        data = np.frombuffer(tensor.raw_data, dtype)
        if data.size != int(np.prod(shape)) or tensor.name in arrays:
            continue  # malformed or a duplicate name: leave it exactly as it was
        arrays[tensor.name] = data.reshape(shape)
        tensor.ClearField("raw_data")
    return arrays


def missing_initializers(proto) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} of the skeleton's initializers whose data was split off."""
    missing = {}
    for tensor in proto.graph.initializer:
        dtype = _splittable(tensor)
        if dtype is not None and not tensor.HasField("raw_data"):
            missing[tensor.name] = (dtype, tuple(int(d) for d in tensor.dims))
    return missing


def fill_initializers(proto, arrays: dict[str, np.ndarray]) -> None:
    """Put split-off data back (in place); ``arrays`` must match :func:`missing_initializers`."""
    for tensor in proto.graph.initializer:
        if tensor.name in arrays and not tensor.HasField("raw_data"):
            dtype = onnx_dtype(tensor)
            tensor.raw_data = np.ascontiguousarray(arrays[tensor.name], dtype).tobytes()


def onnx_dtype(tensor) -> np.dtype:
    """The little-endian numpy dtype of an ONNX tensor's elements."""
    import onnx  # lazy: onnx loads only where ONNX files are written or read

    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).newbyteorder("<")


def int8_weight_params(proto) -> dict[str, tuple[np.ndarray, np.ndarray, int | None]]:
    """{int8 weight initializer: (scale, zero point, channel axis or None)}, read before the
    initializers are split off.

    Weights are the int8 inputs of DequantizeLinear (static QDQ) and of ConvInteger /
    MatMulInteger (dynamic); the latter keep their scale in a separate Mul, so theirs is 1."""
    import onnx  # lazy: onnx loads only where ONNX files are written or read
    from onnx import numpy_helper

    init = {t.name: t for t in proto.graph.initializer}
    int8 = {n for n, t in init.items() if t.data_type == onnx.TensorProto.INT8}

    def array(inputs, i: int, default: np.ndarray) -> np.ndarray:
        return numpy_helper.to_array(init[inputs[i]]) if len(inputs) > i and inputs[i] in init \
            else default

    out: dict[str, tuple[np.ndarray, np.ndarray, int | None]] = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in int8:
            scale = array(node.input, 1, np.ones((), np.float32))
            zp = array(node.input, 2, np.zeros(scale.shape, np.int8))
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            params = (scale, zp, axis if scale.ndim else None)
        elif node.op_type in ("ConvInteger", "MatMulInteger") and len(node.input) > 1 \
                and node.input[1] in int8:
            values = numpy_helper.to_array(init[node.input[1]])
            zp = array(node.input, 3, np.zeros((), np.int8))
            axis = (0 if node.op_type == "ConvInteger" else values.ndim - 1) if zp.ndim else None
            params = (np.ones(zp.shape, np.float32), zp, axis)
        else:
            continue
        out.setdefault(node.input[0] if node.op_type == "DequantizeLinear" else node.input[1],
                       params)
    return out


# -- running it --------------------------------------------------------------------------------


class OnnxModel(nn.Module):
    """An onnxruntime session behind an ``nn.Module`` interface (CPU, float32 in and out).

    ``source`` is an ONNX file or the serialized model itself (``path`` is then None)."""

    def __init__(self, source: str | Path | bytes, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort  # lazy: onnxruntime loads only where an ONNX model runs

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.path = None if isinstance(source, bytes) else str(source)
        self.session = ort.InferenceSession(self.path or source, options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().float().contiguous().numpy()
        (out,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(out).to(x.device)


@register_deploy_format(DEPLOY_FORMAT)
def load_int8(directory: Path, artifact: Artifact) -> nn.Module:
    """The deployed int8 model of an artifact directory, as the runner evaluates it."""
    files = (artifact.deploy or {}).get("files") or [INT8_FILE]
    path = Path(directory) / files[0]
    if not path.is_file():
        raise CompressPipeError(f"{directory}: int8 model file {files[0]!r} is missing")
    return OnnxModel(path)


def deploy_entry() -> dict[str, Any]:
    """``artifact.deploy`` for an int8 ONNX file written into the artifact directory."""
    return {"format": DEPLOY_FORMAT, "files": [INT8_FILE], "module": __name__}
