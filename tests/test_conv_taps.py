"""Trimming convolution taps that only read padding: exact on every geometry, recorded, safe."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compresspipe.compress.quant.conv_taps import (
    Geometry,
    apply_window,
    recorded_windows,
    trim_padding_taps,
    used_window,
)


def test_used_window_by_hand():
    # 3x3, pad 1 on a 1x1 map: only the centre tap reads the input
    assert used_window(Geometry(1, 3, 1, 1, 1, 1)) == (1, 1, 0, 0)
    # 3x3 stride 2 pad 1 on 2x2 -> one output reading rows -1..1: taps 1 and 2
    assert used_window(Geometry(2, 3, 2, 1, 1, 1)) == (1, 2, 0, 0)
    # every tap is used on a large map
    assert used_window(Geometry(8, 3, 1, 1, 1, 1)) is None
    # 5x5 pad 2 on 2x2: taps 1..3 (tap 0 reads -2..-1, tap 4 reads 2..3)
    assert used_window(Geometry(2, 5, 1, 1, 2, 2)) == (1, 3, 1, 1)
    # dilation 2, pad 2 on 1x1: only the centre tap
    assert used_window(Geometry(1, 3, 1, 2, 2, 2)) == (1, 1, 0, 0)


def _conv_model(x_shape, w, *, pads, strides, dilations, group=1, int8=False, shared=False,
                auto_pad=None):
    """A one- (or two-) Conv ONNX graph with a static input shape and weight ``w``."""
    nodes, inits = [], []
    if int8:
        scale = (np.abs(w).max(axis=(1, 2, 3)) / 127 + 1e-6).astype(np.float32)
        q = np.clip(np.round(w / scale[:, None, None, None]), -127, 127).astype(np.int8)
        inits += [numpy_helper.from_array(q, "w"), numpy_helper.from_array(scale, "w_scale"),
                  numpy_helper.from_array(np.zeros(len(scale), np.int8), "w_zp"),
                  numpy_helper.from_array(np.float32(0.05), "x_scale"),
                  numpy_helper.from_array(np.uint8(128), "x_zp")]
        nodes += [helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wf"], axis=0),
                  helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"])]
        weight, x = "wf", "xd"
    else:
        inits.append(numpy_helper.from_array(w.astype(np.float32), "w"))
        weight, x = "w", "x"
    attrs = {"strides": strides, "dilations": dilations, "group": group}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = pads
    if int8:  # a closed DQ -> Conv -> Q island: onnxruntime runs it as QLinearConv
        inits += [numpy_helper.from_array(np.float32(0.1), "y_scale"),
                  numpy_helper.from_array(np.uint8(128), "y_zp")]
        nodes += [helper.make_node("Conv", [x, weight], ["yf"], **attrs),
                  helper.make_node("QuantizeLinear", ["yf", "y_scale", "y_zp"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zp"], ["y"])]
    else:
        nodes.append(helper.make_node("Conv", [x, weight], ["y"], **attrs))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)]
    if shared:
        nodes.append(helper.make_node("Conv", ["x", weight], ["y2"], **attrs))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [None] * 4))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["batch", *x_shape[1:]])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _geometries(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        k = int(rng.choice([1, 3, 5, 7]))
        yield {
            "size": [int(rng.integers(1, 6)), int(rng.integers(1, 6))],
            "kernel": [k, int(rng.choice([1, 3, 5]))],
            "strides": [int(rng.integers(1, 4)), int(rng.integers(1, 3))],
            "dilations": [int(rng.integers(1, 3)), 1],
            "pads": [int(rng.integers(0, k)), int(rng.integers(0, 3)),
                     int(rng.integers(0, k)), int(rng.integers(0, 3))],
        }


@pytest.mark.parametrize("int8", [False, True])
def test_trimmed_graph_has_the_same_outputs(int8):
    rng = np.random.default_rng(1)
    trimmed_some = 0
    for g in _geometries(60):
        span = [d * (k - 1) + 1 for d, k in zip(g["dilations"], g["kernel"])]
        padded = [s + g["pads"][i] + g["pads"][i + 2] for i, s in enumerate(g["size"])]
        if any(p < s for p, s in zip(padded, span)):
            continue  # no output at all: not a valid convolution
        w = rng.standard_normal((4, 3, *g["kernel"])).astype(np.float32)
        x = rng.standard_normal((2, 3, *g["size"])).astype(np.float32)
        model = _conv_model(x.shape, w, pads=g["pads"], strides=g["strides"],
                            dilations=g["dilations"], int8=int8)
        (before,) = _run(model, x)
        windows = trim_padding_taps(model)
        (after,) = _run(model, x)
        assert after.shape == before.shape, g
        if int8:
            np.testing.assert_array_equal(after, before, err_msg=str(g))
        else:
            np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5, err_msg=str(g))
        if windows:
            trimmed_some += 1
            stored = numpy_helper.to_array(next(t for t in model.graph.initializer
                                                if t.name == "w"))
            assert stored.shape == apply_window(w, windows["w"]).shape
            if not int8:  # the kept taps are the original values, untouched
                np.testing.assert_array_equal(stored, apply_window(w, windows["w"]))
            assert recorded_windows(model) == windows
            onnx.checker.check_model(model)
    assert trimmed_some >= 10  # the random geometries exercise the trimming itself


def test_shared_weights_and_auto_pad_are_left_alone():
    w = np.ones((2, 2, 3, 3), np.float32)
    shared = _conv_model((1, 2, 1, 1), w, pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1],
                         shared=True)
    assert trim_padding_taps(shared) == {}
    exposed = _conv_model((1, 2, 1, 1), w, pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1])
    exposed.graph.output.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape))
    assert trim_padding_taps(exposed) == {}  # the weight is also an output of the graph
    inner = _conv_model((1, 2, 1, 1), w, pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1])
    branch = helper.make_graph([helper.make_node("Identity", ["w"], ["b"])], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, w.shape)])
    inner.graph.node.append(helper.make_node(
        "If", ["cond"], ["wb"], then_branch=branch, else_branch=branch))
    assert trim_padding_taps(inner) == {}  # a subgraph reads the weight
    auto = _conv_model((1, 2, 1, 1), w, pads=None, strides=[1, 1], dilations=[1, 1],
                       auto_pad="SAME_UPPER")
    assert trim_padding_taps(auto) == {}
    assert numpy_helper.to_array(auto.graph.initializer[0]).shape == (2, 2, 3, 3)


def test_trimming_twice_composes_windows():
    w = np.arange(2 * 2 * 5 * 5, dtype=np.float32).reshape(2, 2, 5, 5)
    model = _conv_model((1, 2, 1, 1), w, pads=[2, 2, 2, 2], strides=[1, 1], dilations=[1, 1])
    first = trim_padding_taps(model)
    assert first == {"w": [[2, 2], [2, 2]]}
    assert trim_padding_taps(model) == first  # nothing left to trim, the record stays
    stored = numpy_helper.to_array(model.graph.initializer[0])
    np.testing.assert_array_equal(stored, w[:, :, 2:3, 2:3])
    onnx.checker.check_model(model)
