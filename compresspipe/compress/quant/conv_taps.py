"""Convolution kernel taps that only ever read zero padding, removed from an ONNX graph.

A model exported for a fixed input size often runs 3x3 convolutions on 1x1 or 2x2 feature
maps (resnet18 at 32x32 pixels: all of layer4). Eight of the nine taps of such a kernel
multiply padding, which is exactly zero (for int8 inputs, the zero point), so they never change
an output. onnxruntime's fp32 NCHWc kernels skip them; its int8 QLinearConv does not and spends
three times the fp32 time on them. Slicing the kernel to the taps that can touch the input, and
adjusting the padding so every output still reads the same positions, gives a graph with the
same outputs (bit for bit in int8: integer accumulation) and smaller weights.

The exported graphs have a dynamic batch but a fixed spatial size, which is what makes this
exact; the sliced windows are recorded in the model's metadata so that mask checks can map a
stored weight back onto its parameter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

METADATA_KEY = "compresspipe.trimmed_taps"


@dataclass(frozen=True)
class Geometry:
    """One spatial dimension of a convolution."""

    size: int  # input extent
    kernel: int
    stride: int
    dilation: int
    pad_begin: int
    pad_end: int

    @property
    def out(self) -> int:
        span = self.dilation * (self.kernel - 1) + 1
        return (self.size + self.pad_begin + self.pad_end - span) // self.stride + 1


def used_window(g: Geometry) -> tuple[int, int, int, int] | None:
    """``(first tap, last tap, new pad_begin, new pad_end)`` or None when nothing can go.

    Taps outside [first, last] never read an input position for any output; inside, unused
    taps are kept (a kernel is a dense box). The new padding keeps the output size and the
    position every kept tap reads.
    """
    if g.out < 1:
        return None
    used = [k for k in range(g.kernel)
            if any(0 <= j * g.stride - g.pad_begin + k * g.dilation < g.size for j in range(g.out))]
    if not used:
        return None
    # ONNX pads are non-negative: the first tap cannot move past the leading padding
    first = min(used[0], g.pad_begin // g.dilation)
    last = used[-1]
    if first == 0 and last == g.kernel - 1:
        return None
    kernel = last - first + 1
    pad_begin = g.pad_begin - first * g.dilation
    need = (g.out - 1) * g.stride - g.size - pad_begin + g.dilation * (kernel - 1) + 1
    pad_end = max(0, need)
    trimmed = Geometry(g.size, kernel, g.stride, g.dilation, pad_begin, pad_end)
    if trimmed.out != g.out:
        return None
    return first, last, pad_begin, pad_end


def trim_padding_taps(proto) -> dict[str, list[list[int]]]:
    """Slice every Conv weight of ``proto`` (an ``onnx.ModelProto``, changed in place) to the
    taps that can read the input; return ``{weight initializer: [[first, last] per spatial
    dim]}`` for the weights that shrank, also stored in the model's metadata."""
    from onnx import numpy_helper  # lazy: onnx loads only where ONNX files are written or read

    shapes = _spatial_shapes(proto)
    init = {t.name: t for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    consumers = _readers(proto.graph)

    windows = _read(proto)
    stale: set[str] = set()
    for node in proto.graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        weight = _weight_initializer(node.input[1], producers, init, consumers)
        size = shapes.get(node.input[0])
        if weight is None or size is None:
            continue
        attrs = {a.name: a for a in node.attribute}
        if attrs.get("auto_pad") is not None and attrs["auto_pad"].s not in (b"", b"NOTSET"):
            continue
        w = numpy_helper.to_array(init[weight])
        dims = w.ndim - 2
        if dims < 1 or len(size) != dims:
            continue
        pads = list(attrs["pads"].ints) if "pads" in attrs else [0] * (2 * dims)
        strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * dims
        dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * dims
        plan = [used_window(Geometry(size[i], w.shape[2 + i], strides[i], dilations[i],
                                     pads[i], pads[dims + i])) for i in range(dims)]
        if all(p is None for p in plan):
            continue
        box = [slice(None), slice(None)]
        window = []
        for i, p in enumerate(plan):
            if p is None:
                box.append(slice(None))
                window.append([0, w.shape[2 + i] - 1])
            else:
                first, last, pads[i], pads[dims + i] = p
                box.append(slice(first, last + 1))
                window.append([first, last])
        sliced = np.ascontiguousarray(w[tuple(box)])
        init[weight].CopyFrom(numpy_helper.from_array(sliced, weight))
        _set_ints(node, "pads", pads)
        _set_ints(node, "kernel_shape", list(sliced.shape[2:]))
        windows[weight] = _compose(windows.get(weight), window)
        stale.add(node.input[1])
    if stale:
        # recorded shapes of the sliced weights are wrong now; onnxruntime re-infers them
        kept = [v for v in proto.graph.value_info if v.name not in stale]
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(kept)
    if windows:
        _write(proto, windows)
    return windows


def recorded_windows(proto) -> dict[str, list[list[int]]]:
    """The kernel windows ``trim_padding_taps`` recorded in a model (empty when none)."""
    return _read(proto)


def apply_window(array: np.ndarray, window: list[list[int]] | None) -> np.ndarray:
    """The part of a full ``[out, in, *kernel]`` array a trimmed weight keeps."""
    if not window or array.ndim != 2 + len(window):
        return array
    return array[(slice(None), slice(None), *(slice(a, b + 1) for a, b in window))]


def _compose(old: list[list[int]] | None, new: list[list[int]]) -> list[list[int]]:
    """A window of a window (trimming twice), in the original kernel's coordinates."""
    if old is None:
        return new
    return [[o[0] + n[0], o[0] + n[1]] for o, n in zip(old, new)]


def _readers(graph) -> dict[str, int]:
    """How many times each tensor name is read: node inputs, graph outputs, and every name a
    subgraph (If/Loop/Scan body) mentions, which may read an outer tensor."""
    import onnx  # lazy: onnx loads only where ONNX files are written or read

    counts: dict[str, int] = {}

    def add(name: str, n: int = 1) -> None:
        counts[name] = counts.get(name, 0) + n

    for node in graph.node:
        for name in node.input:
            add(name)
        for attr in node.attribute:
            subgraphs = ([attr.g] if attr.type == onnx.AttributeProto.GRAPH
                         else list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else [])
            for sub in subgraphs:
                for name in _readers(sub):
                    add(name, 2)  # never the sole reader
    for value in graph.output:
        add(value.name, 2)
    return counts


def _weight_initializer(name: str, producers: dict, init: dict, consumers: dict) -> str | None:
    """The initializer behind a Conv weight input (directly or through one DequantizeLinear),
    if nothing else reads it (slicing a shared tensor would change another node)."""
    if name in init:
        return name if consumers.get(name) == 1 else None
    node = producers.get(name)
    if node is None or node.op_type != "DequantizeLinear" or consumers.get(name) != 1:
        return None
    source = node.input[0]
    if source not in init or consumers.get(source) != 1:
        return None
    attrs = {a.name: a.i for a in node.attribute}
    if attrs.get("block_size"):  # blocked scales run along the kernel too: not sliced here
        return None
    axis = attrs.get("axis", 1)
    scale = init.get(node.input[1])
    per_tensor = scale is not None and len(scale.dims) == 0
    return source if per_tensor or axis == 0 else None


def _spatial_shapes(proto) -> dict[str, list[int]]:
    """Static spatial extents (dims 2 and on) of every tensor whose shape is known."""
    import onnx  # lazy: onnx loads only where ONNX files are written or read

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # inference is best effort: a tensor without a shape is left alone
        inferred = proto
    out: dict[str, list[int]] = {}
    graph = inferred.graph
    for value in [*graph.value_info, *graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        spatial = list(dims)[2:]
        if len(dims) >= 3 and all(d.HasField("dim_value") for d in spatial):
            out[value.name] = [d.dim_value for d in spatial]
    return out


def _set_ints(node, name: str, values: list[int]) -> None:
    import onnx  # lazy: onnx loads only where ONNX files are written or read

    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(onnx.helper.make_attribute(name, values))


def _read(proto) -> dict[str, list[list[int]]]:
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return {}


def _write(proto, windows: dict[str, list[list[int]]]) -> None:
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = json.dumps(windows, sort_keys=True)
            return
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(windows, sort_keys=True)
