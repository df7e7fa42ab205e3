"""A PT2E quantizer whose QDQ graph onnxruntime turns into real int8 kernels.

torchao's X86InductorQuantizer annotates for Inductor's fusions: it leaves most conv outputs in
fp32, so after ONNX export onnxruntime can fuse only part of the network and int8 ends up
*slower* than fp32. onnxruntime's CPU kernels (QLinearConv, QGemm, QLinearAdd, int8 MaxPool)
want every ``DQ -> op -> Q`` island closed, so this quantizer annotates:

* conv2d / linear: input activation and weight; the output after the op's fusable tail
  (batch norm, and ReLU when activations are asymmetric: ReLU followed by a uint8 Q with zero
  point 0 is removed by onnxruntime);
* add (residual sums): both inputs and the output (after a trailing ReLU, as above);
* max_pool2d: input, and an output that shares the input's quantization parameters.

Everything else (hard-swish, SE multiplies, global pooling) stays fp32 between DQ and Q.
Weights are always symmetric (zero point 0, range [-127, 127]): a pruned weight is exactly 0
in int8, and onnxruntime's VNNI kernels never overflow on -128 * -128 pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torchao.quantization.pt2e import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
)
from torchao.quantization.pt2e.quantizer import (
    QuantizationAnnotation,
    QuantizationSpec,
    Quantizer,
    SharedQuantizationSpec,
)

from .fake_quant import FastMovingAvgObsFakeQuantize

aten = torch.ops.aten
WEIGHTED = (aten.conv2d.default, aten.linear.default)
BATCH_NORMS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
RELUS = (aten.relu.default, aten.relu_.default)
ADDS = (aten.add.Tensor, aten.add_.Tensor)
MAX_POOLS = (aten.max_pool2d.default,)
ANNOTATION_KEY = "quantization_annotation"


@dataclass(frozen=True)
class QDQScheme:
    """How tensors are quantized: weights per channel or per tensor, activations
    asymmetric uint8 or symmetric int8; observers for calibration (PTQ) or fake quant (QAT)."""

    per_channel: bool = True
    symmetric_activations: bool = False
    qat: bool = False
    observer: str = "histogram"  # PTQ activation observer: 'histogram' or 'minmax'
    # weights ('layer1.0.conv1.weight') whose op is left unannotated: it runs in float between
    # the neighbours' DQ and Q (mixed precision)
    float_weights: frozenset[str] = frozenset()

    def describe(self) -> dict:
        """The scheme as the artifact records it."""
        return {"per_channel": self.per_channel,
                "activations": "int8 symmetric" if self.symmetric_activations else "uint8 affine"}


def activation_spec(scheme: QDQScheme) -> QuantizationSpec:
    """uint8 affine (asymmetric) or int8 symmetric per-tensor activations."""
    if scheme.qat:
        ctr = FastMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver,
                                                      eps=2**-12)
    elif scheme.observer == "histogram":
        ctr = HistogramObserver.with_args(eps=2**-12)
    else:
        ctr = MinMaxObserver.with_args(eps=2**-12)
    if scheme.symmetric_activations:
        return QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127,
                                qscheme=torch.per_tensor_symmetric, observer_or_fake_quant_ctr=ctr)
    return QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255,
                            qscheme=torch.per_tensor_affine, observer_or_fake_quant_ctr=ctr)


def weight_spec(scheme: QDQScheme) -> QuantizationSpec:
    """Symmetric int8 weights in [-127, 127], per output channel (axis 0) or per tensor."""
    if scheme.per_channel:
        observer = MovingAveragePerChannelMinMaxObserver if scheme.qat else PerChannelMinMaxObserver
        qscheme, axis = torch.per_channel_symmetric, 0
    else:
        observer = MovingAverageMinMaxObserver if scheme.qat else MinMaxObserver
        qscheme, axis = torch.per_tensor_symmetric, None
    ctr = (FastMovingAvgObsFakeQuantize.with_args(observer=observer, eps=2**-12) if scheme.qat
           else observer.with_args(eps=2**-12))
    return QuantizationSpec(dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=qscheme,
                            ch_axis=axis, observer_or_fake_quant_ctr=ctr)


class QDQQuantizer(Quantizer):
    """Annotates conv/linear, residual adds and max pools for onnxruntime's QDQ fusions."""

    def __init__(self, scheme: QDQScheme):
        super().__init__()
        self.scheme = scheme
        self.act = activation_spec(scheme)
        self.weight = weight_spec(scheme)

    def annotate(self, model: GraphModule) -> GraphModule:
        for node in list(model.graph.nodes):
            if node.op != "call_function" or _annotated(node):
                continue
            if node.target in WEIGHTED:
                self._annotate_weighted(node)
            elif node.target in ADDS and _is_activation_sum(node):
                self._annotate_add(node)
            elif node.target in MAX_POOLS:
                _annotate(node, {node.args[0]: self.act},
                          SharedQuantizationSpec((node.args[0], node)))
        return model

    def validate(self, model: GraphModule) -> None:
        pass

    def _annotate_weighted(self, node: Node) -> None:
        x, w = node.args[0], node.args[1]
        if isinstance(w, Node) and w.op == "get_attr" and w.target in self.scheme.float_weights:
            return
        _annotate(node, {x: self.act, w: self.weight}, None)
        self._close(node)

    def _annotate_add(self, node: Node) -> None:
        a, b = node.args[0], node.args[1]
        _annotate(node, {a: self.act, b: self.act}, None)
        self._close(node)

    def _close(self, node: Node) -> None:
        """Quantize the output at the end of the op's fusable tail (BN, then ReLU)."""
        tail = node
        nxt = _sole_user(tail)
        if nxt is not None and nxt.target in BATCH_NORMS:
            tail = nxt
            _annotate(tail, {}, None)
            nxt = _sole_user(tail)
        if nxt is not None and nxt.target in RELUS and not self.scheme.symmetric_activations:
            tail = nxt
            _annotate(tail, {}, None)
        tail.meta[ANNOTATION_KEY].output_qspec = self.act


def _annotate(node: Node, inputs: dict, output) -> None:
    node.meta[ANNOTATION_KEY] = QuantizationAnnotation(
        input_qspec_map=inputs, output_qspec=output, _annotated=True)


def _annotated(node: Node) -> bool:
    ann = node.meta.get(ANNOTATION_KEY)
    return bool(ann is not None and ann._annotated)


def _sole_user(node: Node) -> Node | None:
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_function":
        return None
    return users[0]


def _is_activation_sum(node: Node) -> bool:
    """A residual sum of two computed float tensors (not a counter increment on a buffer)."""
    if len(node.args) < 2 or not all(isinstance(a, Node) for a in node.args[:2]):
        return False
    vals = [a.meta.get("val") for a in node.args[:2]]
    if any(v is None or not v.is_floating_point() for v in vals):
        return False
    return all(a.op != "get_attr" for a in node.args[:2]) and vals[0].shape == vals[1].shape
