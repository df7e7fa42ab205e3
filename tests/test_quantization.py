"""int8 quantization: QAT and PTQ to an ONNX file that onnxruntime runs in int8.

One pipeline (dense -> prune two tensors -> ptq -> qat distilling from the dense stage) is
shared by most tests; its numbers are the runner's, measured on the files reloaded from disk.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
import warnings

import numpy as np
import onnx
import pytest
import torch
from conftest import tiny_pipeline
from mlflow.tracking import MlflowClient
from onnx import numpy_helper

import compresspipe
import compresspipe.stages.qat
import compresspipe.stages.teacher
from compresspipe.compress.quant.conv_taps import apply_window, recorded_windows
from compresspipe.compress.quant.onnx_int8 import INT8_FILE, check_int8_masks
from compresspipe.compress.quant.pt2e import example_batch
from compresspipe.core.config import DataConfig
from compresspipe.core.data import build_data
from compresspipe.core.errors import CompressPipeError, ConfigError, MaskViolation
from compresspipe.pipeline.loader import load_pipeline
from compresspipe.stages.base import Stage, StageConfig

_REAL_DISTILL_HOOK = compresspipe.stages.teacher.distill_hook
# layer4.0.conv2 runs on a 1x1 feature map at 16x16 inputs: the file keeps only its centre taps
PRUNED = ("layer1.0.conv1.weight", "fc.weight", "layer4.0.conv2.weight")


pytestmark = pytest.mark.usefixtures("one_thread")


class MagnitudePruneConfig(StageConfig):
    tensor: str


class MagnitudePrune(Stage):
    """Zeroes the smaller-magnitude half of one tensor and records the mask."""

    Config = MagnitudePruneConfig

    def run(self, artifact, ctx):
        param = dict(artifact.model.named_parameters())[self.config.tensor]
        mask = param.detach().abs() > param.detach().abs().median()
        with torch.no_grad():
            param.mul_(mask)
        artifact.masks[self.config.tensor] = mask
        return artifact


_HOOK_CALLS: list = []


def _recording_distill_hook(cfg, ctx, student):
    """Wraps the real distillation hook and records what the qat stage handed it."""
    _HOOK_CALLS.append((cfg, ctx.spec.name, student))
    return _REAL_DISTILL_HOOK(cfg, ctx, student)


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "out"
    cfg = tiny_pipeline(out, epochs=2)
    cfg["stages"] = [
        {"name": "dense", "train": {"epochs": 3, "lr": 0.05, "warmup_epochs": 0.5}},
        {"name": "prune-conv", "test_quantization:MagnitudePrune": {"tensor": PRUNED[0]}},
        {"name": "prune-fc", "test_quantization:MagnitudePrune": {"tensor": PRUNED[1]}},
        {"name": "prune-late", "test_quantization:MagnitudePrune": {"tensor": PRUNED[2]}},
        {"name": "ptq", "ptq": {"calibration_batches": 4, "latency_repeats": 2}},
        {"name": "qat", "qat": {"epochs": 1, "lr": 0.005, "freeze_bn_after": 0,
                                "latency_repeats": 0, "distill": {"teacher": "stage:dense"}}},
    ]
    _HOOK_CALLS.clear()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
        mp.setattr(compresspipe.stages.qat, "distill_hook", _recording_distill_hook)
        warnings.simplefilter("always")
        summary = compresspipe.run(cfg)
    return out, summary, caught


def _metrics(summary, name):
    return next(r for r in summary["stages"] if r["name"] == name)["metrics"]


def _stage_run(summary, name):
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    return client, client.get_run(summary["stage_runs"][name])


def _onnx_weight(path, name):
    """(int8 values, zero point broadcast to their shape) of weight ``name``, read with onnx."""
    proto = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == name)
    q, zp = init[name], init[dq.input[2]]
    if zp.ndim:
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        zp = zp.reshape(shape)
    return q, np.broadcast_to(zp, q.shape)


def test_int8_accuracy_within_one_point_of_fp32(int8_run):
    _, summary, _ = int8_run
    fp32 = _metrics(summary, "prune-late")["test_top1"]
    assert fp32 > 90.0  # the comparison means something only for a model that learned
    assert abs(_metrics(summary, "ptq")["test_top1"] - fp32) <= 1.0
    assert _metrics(summary, "qat")["test_top1"] >= fp32 - 1.0


def test_deployed_model_is_the_int8_file(int8_run):
    out, summary, _ = int8_run
    dense_bytes = _metrics(summary, "dense")["model_bytes"]
    for stage in ("ptq", "qat"):
        record = next(r for r in summary["stages"] if r["name"] == stage)
        path = out / stage / INT8_FILE
        assert record["model_files"] == [INT8_FILE]
        assert record["metrics"]["model_bytes"] == path.stat().st_size
        assert record["metrics"]["model_bytes"] < dense_bytes / 3
        ops = json.loads((out / stage / "artifact.json").read_text())["quant"]["int8"]
        ops = ops["onnxruntime_ops"]
        assert ops.get("QLinearConv", 0) > 5 and "Conv" not in ops  # every conv runs in int8
        q, _ = _onnx_weight(path, PRUNED[0])
        assert q.dtype == np.int8


@pytest.mark.parametrize("stage", ["ptq", "qat"])
def test_pruned_weights_are_exact_zeros_in_int8(int8_run, stage):
    out, summary, _ = int8_run
    art = compresspipe.load(out / stage)
    params = dict(art.model.named_parameters())
    windows = recorded_windows(onnx.load(str(out / stage / INT8_FILE)))
    assert set(windows) >= {PRUNED[2]}
    for name in PRUNED:
        full = art.masks[name].numpy()
        assert (~full).sum() >= full.size // 2
        mask = apply_window(full, windows.get(name))
        q, zero = _onnx_weight(out / stage / INT8_FILE, name)
        if q.shape != mask.shape:  # stored transposed
            q, zero = q.T, zero.T
        assert np.array_equal(q[~mask], zero[~mask])  # dequantizes to exactly 0.0
        assert np.count_nonzero(q[mask] != zero[mask]) > 0.9 * mask.sum()  # the rest lives
        assert torch.count_nonzero(params[name].detach()[~art.masks[name]]) == 0


@pytest.mark.parametrize("name", [PRUNED[0], PRUNED[2]])
def test_mask_check_catches_a_revived_weight(int8_run, name):
    out, _, _ = int8_run
    art = compresspipe.load(out / "qat")
    wrong = {name: ~art.masks[name]}  # claims the surviving half is pruned
    with pytest.raises(MaskViolation, match=name.replace(".", r"\.")):
        check_int8_masks(out / "qat" / INT8_FILE, wrong, "qat")


def test_padding_only_taps_are_trimmed_and_reported(int8_run):
    out, summary, _ = int8_run
    art = compresspipe.load(out / "qat")
    windows = recorded_windows(onnx.load(str(out / "qat" / INT8_FILE)))
    q, _ = _onnx_weight(out / "qat" / INT8_FILE, PRUNED[2])
    assert windows[PRUNED[2]] == [[1, 1], [1, 1]] and q.shape == (96, 96, 1, 1)
    quant = json.loads((out / "qat" / "artifact.json").read_text())["quant"]["int8"]
    removed = {n: art.masks[n].numel() - apply_window(art.masks[n].numpy(), w).size
               for n, w in windows.items() if n in art.masks}
    assert removed[PRUNED[2]] == 96 * 96 * 8
    assert quant["trimmed_weight_entries"][PRUNED[2]] == removed[PRUNED[2]]
    _, run = _stage_run(summary, "qat")
    m = run.data.metrics
    assert m["trimmed_conv_weights"] == len(windows)
    assert m["trimmed_weight_entries"] == sum(quant["trimmed_weight_entries"].values())


def test_int8_file_runs_without_compresspipe(int8_run, tmp_path):
    out, _, _ = int8_run
    art = compresspipe.load(out / "qat")
    x = example_batch(build_data(DataConfig(name="digits", image_size=16)).test, 8)
    np.save(tmp_path / "x.npy", x.numpy())
    script = (
        "import sys, numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(out / 'qat' / INT8_FILE)!r})\n"
        "y = s.run(None, {s.get_inputs()[0].name: np.load('x.npy')})[0]\n"
        "np.save('y.npy', y)\n"
        "print(','.join(m for m in sys.modules if m.split('.')[0] in ('compresspipe', 'torch')))\n"
    )
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""  # neither compresspipe nor torch was imported
    standalone = np.load(tmp_path / "y.npy")
    in_process = art.deployed_model(out / "qat")(x).numpy()
    np.testing.assert_allclose(standalone, in_process, rtol=0, atol=1e-6)
    with torch.no_grad():
        fp32 = art.model(x).argmax(1).numpy()
    assert (standalone.argmax(1) == fp32).mean() >= 0.75


def test_int8_metrics_are_tracked(int8_run):
    out, summary, _ = int8_run
    _, qat = _stage_run(summary, "qat")
    m = qat.data.metrics
    assert m["int8_bytes"] == (out / "qat" / INT8_FILE).stat().st_size
    assert m["int8_top1"] == pytest.approx(_metrics(summary, "qat")["test_top1"])
    assert {"fp32_top1", "int8_top1_drop", "int8_kernels", "bits_per_weight"} <= set(m)
    assert m["int8_masked_tensors_checked"] == len(PRUNED)
    _, ptq = _stage_run(summary, "ptq")
    assert {"latency_fp32_b1_ms", "latency_int8_b1_ms", "latency_int8_over_fp32_b64",
            "latency_fp32_onnxruntime_b1_ms", "latency_int8_over_fp32_onnxruntime_b64"} <= set(
        ptq.data.metrics)
    assert ptq.data.metrics["latency_threads"] == 1


def test_qat_uses_the_distillation_hook(int8_run):
    _, summary, _ = int8_run
    (cfg, stage, student), = _HOOK_CALLS
    assert stage == "qat" and cfg.teacher == "stage:dense"
    # the student is the captured fake-quant graph, with the model's parameter names
    assert PRUNED[0] in dict(student.named_parameters())
    client, qat = _stage_run(summary, "qat")
    assert [m.step for m in client.get_metric_history(qat.info.run_id, "train_kd")] == [1]
    assert qat.data.metrics["qat_bn_frozen"] == 1.0


def test_no_deprecation_warnings(int8_run):
    _, _, caught = int8_run
    bad = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
           and ("compresspipe" in w.filename or "torch/ao/" in w.filename)]
    assert not bad, [f"{w.filename}:{w.lineno}: {w.message}" for w in bad]


def test_qat_schedule_freezes_bn_then_observers():
    import timm
    from torchao.quantization.pt2e import FakeQuantizeBase

    from compresspipe.compress.quant.pt2e import (
        QATScheduleHook,
        enable_train_eval,
        nudge_zero_bn_scales,
        prepare_qat,
    )
    from compresspipe.compress.quant.qdq import QDQScheme

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10)
    nudge_zero_bn_scales(model, {})
    x = torch.randn(8, 1, 16, 16)
    prepared = prepare_qat(model, x[:2], QDQScheme(qat=True))
    modes = enable_train_eval(prepared)
    hook = QATScheduleHook(prepared, modes, freeze_bn_after=1, freeze_observers_after=2)
    hook.on_train_start(types.SimpleNamespace(start_epoch=0))
    fqs = [m for m in prepared.modules() if isinstance(m, FakeQuantizeBase)]

    def snapshot():
        prepared.train()
        before = {k: v.clone() for k, v in prepared.state_dict().items()}
        prepared(x)
        after = prepared.state_dict()
        return {k for k in before if not torch.equal(before[k], after[k])}

    assert any(k.endswith("running_mean") for k in snapshot())
    metrics: dict = {}
    hook.on_epoch_end(0, metrics)
    changed = snapshot()
    assert metrics == {"qat_bn_frozen": 1.0, "qat_observers_frozen": 0.0}
    assert not any(k.endswith(("running_mean", "running_var")) for k in changed)
    assert any(k.endswith(".scale") for k in changed)  # observers still follow the data
    hook.on_epoch_end(1, metrics)
    assert all(int(m.observer_enabled) == 0 for m in fqs)
    assert not any(k.endswith((".scale", ".zero_point", "min_val", "max_val")) for k in snapshot())


def test_evaluation_does_not_fit_the_int8_grid_to_test_images():
    import timm

    from compresspipe.compress.quant.pt2e import (
        enable_train_eval,
        nudge_zero_bn_scales,
        prepare_qat,
    )
    from compresspipe.compress.quant.qdq import QDQScheme

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10)
    nudge_zero_bn_scales(model, {})
    prepared = prepare_qat(model, torch.randn(2, 1, 16, 16), QDQScheme(qat=True))
    enable_train_eval(prepared)
    prepared.train()
    prepared(torch.randn(8, 1, 16, 16))

    def grid():
        return {k: v.clone() for k, v in prepared.state_dict().items()
                if k.endswith((".scale", ".zero_point", "min_val", "max_val"))}

    prepared.eval()
    before = grid()
    with torch.no_grad():
        prepared(torch.randn(8, 1, 16, 16) * 50)  # "test images" far outside the range seen
    assert all(torch.equal(before[k], v) for k, v in grid().items())
    prepared.train()
    prepared(torch.randn(8, 1, 16, 16) * 50)
    assert any(not torch.equal(before[k], v) for k, v in grid().items())


def test_zero_bn_scales_are_nudged_but_a_pruned_one_is_an_error():
    import timm

    from compresspipe.compress.quant.pt2e import ZERO_GAMMA, nudge_zero_bn_scales

    model = timm.create_model("test_resnet", in_chans=1, num_classes=10)  # zero-init last BNs
    nudged = nudge_zero_bn_scales(model, {})
    assert "layer1.0.bn2" in nudged
    assert torch.all(model.layer1[0].bn2.weight == ZERO_GAMMA)
    model.layer2[0].bn1.weight.data[0] = 0
    with pytest.raises(CompressPipeError, match=r"layer2\.0\.bn1\.weight"):
        nudge_zero_bn_scales(model, {"layer2.0.bn1.weight": torch.ones(1, dtype=torch.bool)})


def test_static_symmetric_per_tensor_scheme(tmp_path):
    import timm

    from compresspipe.compress.quant.onnx_int8 import OnnxModel, export_onnx
    from compresspipe.compress.quant.pt2e import calibrate, convert, prepare_ptq
    from compresspipe.compress.quant.qdq import QDQScheme

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10).eval()
    x = torch.rand(32, 1, 16, 16)
    scheme = QDQScheme(per_channel=False, symmetric_activations=True, observer="minmax")
    prepared = prepare_ptq(model, x[:2], scheme)
    calibrate(prepared, [(x, None)], 1)
    path = export_onnx(convert(prepared), x[:2], tmp_path / "m.onnx", trim_taps=False)
    proto = onnx.load(str(path))
    assert recorded_windows(proto) == {}
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    act_zps = [init[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert act_zps and all(z.dtype == np.int8 and z.item() == 0 for z in act_zps)
    weight_scales = [init[n.input[1]] for n in proto.graph.node
                     if n.op_type == "DequantizeLinear" and init.get(n.input[0]) is not None
                     and init[n.input[0]].ndim == 4]
    assert weight_scales and all(s.ndim == 0 for s in weight_scales)  # one scale per tensor
    assert {tuple(init[n.input[0]].shape) for n in proto.graph.node if n.op_type ==
            "DequantizeLinear" and n.input[0] == "layer4.0.conv2.weight"} == {(96, 96, 3, 3)}
    with torch.no_grad():
        ref = model(x)
    out = OnnxModel(path)(x)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.8


def test_dynamic_ptq_of_a_linear_model(tmp_path):
    cfg = tiny_pipeline(tmp_path / "out", tracking={"enabled": False})
    cfg["model"] = {"factory": "factories_for_tests:mlp", "kwargs": {"img": 16, "hidden": 64}}
    cfg["stages"] = [
        {"name": "dense", "train": {"epochs": 2, "lr": 0.05}},
        {"name": "prune", "stages_for_tests:ZeroHalf": {"tensor": "1.weight"}},
        {"name": "dyn", "ptq": {"mode": "dynamic", "latency_repeats": 0}},
    ]
    summary = compresspipe.run(cfg)
    quant = json.loads((tmp_path / "out" / "dyn" / "artifact.json").read_text())["quant"]["int8"]
    assert quant["method"] == "ptq-dynamic"
    assert quant["masked_tensors_checked"] == 1 and quant["masked_tensors_not_in_file"] == []
    assert not {"Gemm", "MatMul", "FusedGemm"} & set(quant["onnxruntime_ops"])  # all int8
    assert abs(_metrics(summary, "dyn")["test_top1"] - _metrics(summary, "prune")["test_top1"]) <= 1.0
    assert _metrics(summary, "dyn")["model_bytes"] < _metrics(summary, "prune")["model_bytes"] / 3


def test_invalid_settings_are_reported_before_running(tmp_path):
    cfg = tiny_pipeline(tmp_path / "out")
    cfg["stages"] = [{"qat": {"epochs": 2, "freeze_bn_after": 2}},
                     {"ptq": {"calibration_batches": 0, "mode": "dynamc"}}]
    with pytest.raises(ConfigError) as err:
        load_pipeline(cfg)
    text = str(err.value)
    assert "stages[0].qat: freeze_bn_after (2) must be below epochs (2)" in text
    assert "stages[1].ptq.calibration_batches" in text
    assert "stages[1].ptq.mode: expected one of 'static', 'dynamic'" in text

    # checked against the real model, before any training
    cfg["stages"] = [{"qat": {"distill": {"teacher": "resnet18", "features": [
        {"student": "layer1", "teacher": "layer1"}]}, "freeze": ["layer9.*"]}}]
    with pytest.raises(ConfigError) as err:
        load_pipeline(cfg)
    text = str(err.value)
    assert "stages[0].qat.distill.features: feature distillation needs module hooks" in text
    assert "stages[0].qat.freeze[0]: pattern 'layer9.*' matches no parameter" in text
