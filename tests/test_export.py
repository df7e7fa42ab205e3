"""The export stage: every file loads in a fresh process (without compresspipe, except .cpz) with
the accuracy compresspipe reports; the deployed model, its size and its masks stay as they were.

One pipeline carries most tests: dense -> prune -> export (safetensors, onnx, torch_export,
logged to MLflow) -> cluster -> huffman -> export (default formats after huffman).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import yaml
from conftest import tiny_pipeline
from mlflow.tracking import MlflowClient
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import compresspipe
import compresspipe.compress.quant.onnx_int8 as onnx_int8
import compresspipe.core.models
import compresspipe.stages.export as export_stage
from compresspipe.compress.quant.onnx_int8 import INT8_FILE, check_int8_masks
from compresspipe.core.errors import CompressPipeError, ConfigError, MaskViolation
from compresspipe.core.measure import check_tensor_masks
from compresspipe.formats.cpz_onnx import export_unfused
from compresspipe.formats.export import (
    Exported,
    run_consumer,
    write_dense_safetensors,
    write_split,
    write_torch_export,
)

DENSE_FORMATS = ["safetensors", "onnx", "torch_export"]


def _stages(summary):
    return {r["name"]: r for r in summary["stages"]}


def _manifest(out, stage):
    return json.loads((out / stage / "export.json").read_text())


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    cfg = tiny_pipeline(out)
    cfg["stages"] = [
        cfg["stages"][0],
        {"name": "prune", "prune": {"sparsity": 0.8, "train": {"epochs": 1, "lr": 0.02}}},
        {"name": "export-dense", "export": {"formats": DENSE_FORMATS}},
        {"name": "cluster", "cluster": {"conv_bits": 4, "linear_bits": 4,
                                        "finetune": {"epochs": 0}}},
        {"name": "huffman", "huffman": {}},
        {"name": "export", "export": {"log_model": False}},
    ]
    return out, compresspipe.run(cfg)


def test_every_file_gives_the_reported_accuracy_in_a_fresh_process(chain):
    out, summary = chain
    stages = _stages(summary)
    pruned = stages["prune"]["metrics"]["test_top1"]
    assert pruned > 80.0  # equal accuracies mean something only for a model that learned
    manifest = _manifest(out, "export-dense")
    assert list(manifest["formats"]) == DENSE_FORMATS
    for fmt, rec in manifest["formats"].items():
        assert rec["verified"] and rec["holds"] == "deployed model", fmt
        assert rec["reference_top1"] == pytest.approx(pruned, abs=1e-9), fmt
        assert abs(rec["top1"] - pruned) <= 0.1, fmt  # one digit of 360 is 0.28 points
        assert "compresspipe" not in rec["imported_by_consumer"], fmt
    assert manifest["formats"]["onnx"]["imported_by_consumer"] == ["onnxruntime"]  # no torch
    assert manifest["formats"]["safetensors"]["consumer"] == "timm + safetensors"


def test_files_are_in_the_artifact_with_their_reported_bytes(chain):
    out, summary = chain
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    logged = client.get_run(summary["stage_runs"]["export-dense"]).data.metrics
    files = _stages(summary)["export-dense"]["files"]
    for fmt, rec in _manifest(out, "export-dense")["formats"].items():
        size = (out / "export-dense" / rec["file"]).stat().st_size
        assert rec["bytes"] == size == files[rec["file"]] == logged[f"export_{fmt}_bytes"], fmt
        assert logged[f"export_{fmt}_top1"] == rec["top1"]
        assert logged[f"export_{fmt}_verified"] == 1.0
    with safe_open(str(out / "export-dense" / "model.dense.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["timm_model"] == "test_resnet"
    assert json.loads(meta["timm_kwargs"]) == {"in_chans": 1, "num_classes": 10}


def test_deployed_model_and_size_are_those_of_the_stage_before(chain):
    out, summary = chain
    stages = _stages(summary)
    for before, export, files in (("prune", "export-dense", ["model.safetensors"]),
                                  ("huffman", "export", ["model.cpz"])):
        a, b = stages[before], stages[export]
        assert b["model_files"] == files
        for key in ("deployed_val_top1", "test_top1", "test_loss", "model_bytes", "nonzero_params"):
            assert b["metrics"][key] == a["metrics"][key], (export, key)
    # the exported .cpz is the huffman stage's file, byte for byte
    assert (out / "export" / "model.cpz").read_bytes() == (out / "huffman" / "model.cpz").read_bytes()


def test_masks_hold_in_the_artifact_and_every_exported_file(chain):
    out, _ = chain
    masks = compresspipe.load(out / "prune").masks
    exported = compresspipe.load(out / "export-dense")
    assert set(exported.masks) == set(masks) and masks
    for name, mask in masks.items():
        assert torch.equal(exported.masks[name], mask)
        assert (~mask).sum() > 0
    check_tensor_masks(load_file(str(out / "export-dense" / "model.dense.safetensors")), masks, "t", "f")
    checked = {fmt: rec["masked_tensors_checked"]
               for fmt, rec in _manifest(out, "export-dense")["formats"].items()}
    assert checked["safetensors"] == checked["torch_export"] == len(masks)
    # the exporter folds batch norm into the convolutions: new tensors; the classifier is as is
    assert checked["onnx"] >= 1 and "fc.weight" in masks
    check_int8_masks(out / "export-dense" / "model.onnx", {"fc.weight": masks["fc.weight"]}, "t")
    # later stages go on with the same masks
    assert set(compresspipe.load(out / "export").masks) == set(masks)


def test_check_tensor_masks_catches_a_revived_weight():
    masks = {"w": torch.tensor([True, False, True])}
    check_tensor_masks({"w": torch.tensor([1.0, 0.0, 2.0])}, masks, "stage 'x': format 'onnx'", "m.onnx")
    with pytest.raises(MaskViolation, match=r"format 'onnx': 1 pruned weights of 'w'.*m\.onnx"):
        check_tensor_masks({"w": torch.tensor([1.0, 1e-9, 2.0])}, masks, "stage 'x': format 'onnx'",
                    "m.onnx")


def test_cpz_export_after_huffman_is_read_back_by_compresspipe(chain):
    out, summary = chain
    manifest = _manifest(out, "export")
    huffman = _stages(summary)["huffman"]["metrics"]["test_top1"]
    assert list(manifest["formats"]) == ["cpz", "onnx"]  # the default after huffman
    assert manifest["deployed_format"] == "cpz" and manifest["mlflow_model_uri"] is None
    cpz, fp32 = manifest["formats"]["cpz"], manifest["formats"]["onnx"]
    assert cpz["consumer"] == "compresspipe (fresh process)" and "own container" in cpz["note"]
    assert "compresspipe" in cpz["imported_by_consumer"]
    assert fp32["imported_by_consumer"] == ["onnxruntime"]
    for rec in (cpz, fp32):
        assert rec["verified"] and abs(rec["top1"] - huffman) <= 0.1


def test_final_model_is_an_mlflow_onnx_model_with_an_input_example(chain, tmp_path):
    out, summary = chain
    uri = _manifest(out, "export-dense")["mlflow_model_uri"]
    assert uri.startswith("models:/")
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    model = client.get_logged_model(uri.removeprefix("models:/"))
    run = client.get_run(summary["stage_runs"]["export-dense"])
    assert model.source_run_id == run.info.run_id
    assert model.experiment_id == run.info.experiment_id
    # by its artifact location: mlflow resolves a models:/ URI with the process-wide store
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                     dst_path=str(tmp_path)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert "onnx" in mlmodel["flavors"] and mlmodel["signature"]["inputs"]
    example = np.asarray(json.loads((local / "input_example.json").read_text()), np.float32)
    assert example.shape[1:] == (1, 16, 16)
    predicted = mlflow.pyfunc.load_model(str(local)).predict(example)
    session = ort.InferenceSession(str(out / "export-dense" / "model.onnx"))
    (direct,) = session.run(None, {"input": example})
    np.testing.assert_allclose(np.asarray(predicted["logits"]), direct, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    out = tmp_path_factory.mktemp("export-int8") / "out"
    cfg = tiny_pipeline(out, epochs=1, tracking={"enabled": False})
    cfg["stages"] = [
        cfg["stages"][0],
        {"name": "ptq", "ptq": {"calibration_batches": 2, "latency_repeats": 0}},
        {"name": "export", "export": {"formats": ["onnx", "safetensors"]}},
    ]
    return out, compresspipe.run(cfg)


def test_int8_export_is_the_measured_int8_file(int8):
    out, summary = int8
    stages = _stages(summary)
    manifest = _manifest(out, "export")
    onnx = manifest["formats"]["onnx"]
    assert onnx["file"] == INT8_FILE and onnx["holds"] == "deployed model"
    assert (out / "export" / INT8_FILE).read_bytes() == (out / "ptq" / INT8_FILE).read_bytes()
    assert stages["export"]["model_files"] == [INT8_FILE]
    assert stages["export"]["metrics"]["test_top1"] == stages["ptq"]["metrics"]["test_top1"]
    assert onnx["reference_top1"] == pytest.approx(stages["ptq"]["metrics"]["test_top1"], abs=1e-9)
    assert abs(onnx["top1"] - onnx["reference_top1"]) <= 0.1
    assert manifest["mlflow_model_uri"] is None  # tracking off: logging skipped, no error


def test_int8_fp32_weights_are_labelled_as_not_the_deployed_model(int8):
    out, summary = int8
    dense = _manifest(out, "export")["formats"]["safetensors"]
    assert dense["holds"] == "fp32 weights (not the deployed model)"
    # ptq leaves the fp32 weights as trained, so the file holds the dense stage's model
    assert dense["reference_top1"] == pytest.approx(_stages(summary)["dense"]["metrics"]["test_top1"],
                                                    abs=1e-9)
    assert dense["verified"] and abs(dense["top1"] - dense["reference_top1"]) <= 0.1


def test_consumer_mismatch_fails_the_stage_loudly(tmp_path, monkeypatch):
    real = onnx_int8.export_onnx

    def wrong_model(module, example, path, opset=None, trim_taps=True):
        # a file that loads fine but is not the model: another network's weights
        torch.manual_seed(1)
        return real(compresspipe.core.models.build_from_spec(
            {"source": "timm", "name": "test_resnet", "kwargs": {"in_chans": 1,
                                                                  "num_classes": 10}}).eval(),
            example, path, opset, trim_taps)

    monkeypatch.setattr(export_stage, "export_onnx", wrong_model)
    cfg = tiny_pipeline(tmp_path / "out", epochs=1, tracking={"enabled": False})
    cfg["stages"] = [cfg["stages"][0], {"name": "export", "export": {"formats": ["onnx"]}}]
    with pytest.raises(CompressPipeError, match=r"stage 'export': format 'onnx' \(model\.onnx\): "
                       r"top1 \d+\.\d\d% in a fresh process \(onnxruntime\) but \d+\.\d\d% in "
                       r"compresspipe, more than 0\.1 points apart"):
        compresspipe.run(cfg)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert not (tmp_path / "out" / "export").exists()


def test_factory_model_is_checked_through_compresspipe(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    spec = {"source": "factory", "factory": "factories_for_tests:mlp",
            "kwargs": {"in_chans": 1, "num_classes": 10, "img": 8}}
    compresspipe.core.models.allow_factory(spec["factory"])
    model = compresspipe.core.models.build_from_spec(spec).eval()
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    with torch.no_grad():
        expected = 100.0 * (model(x).argmax(1) == y).float().mean().item()
    path = tmp_path / "m.safetensors"
    write_dense_safetensors(model, spec, path)
    with safe_open(str(path), "pt") as f:
        assert "timm_model" not in f.metadata()  # plain timm cannot build it
    item = Exported("safetensors", path, True, expected, "compresspipe", 0)
    x_path, y_path = write_split(DataLoader(TensorDataset(x, y), batch_size=16), tmp_path / "s")
    run_consumer(item, x_path, y_path, 16, 120, spec)
    assert item.top1 == pytest.approx(expected)
    assert "compresspipe" in item.imported


def test_unreadable_file_is_one_clear_error(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a protobuf")
    split = DataLoader(TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)))
    x_path, y_path = write_split(split, tmp_path / "s")
    with pytest.raises(CompressPipeError, match=r"stage 'export': format 'onnx' \(model\.onnx, "
                       r"consumer onnxruntime\): the fresh-process check failed: .+"):
        run_consumer(Exported("onnx", path, True, 50.0, "onnx", 0), x_path, y_path, 2, 120)


def test_untraceable_model_fails_naming_the_format(tmp_path):
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow

    with pytest.raises(CompressPipeError, match="format 'torch_export': torch.export could not"):
        write_torch_export(Branchy(), torch.ones(2, 3), tmp_path / "m.pt2",
                           "stage 'export': format 'torch_export'")


@pytest.mark.parametrize("stage, message", [
    ({"export": {"formats": ["cpz"]}}, "stages[1].export.log_model: the MLflow model is the "
                                       "exported ONNX file"),
    ({"export": {"formats": ["onnx", "onnx"]}}, "each format at most once"),
    ({"export": {"formats": ["tflite"]}}, "stages[1].export.formats"),
    ({"export": {"opset": 11}}, "stages[1].export.opset"),
])
def test_invalid_settings_are_reported_before_running(tmp_path, stage, message):
    cfg = tiny_pipeline(tmp_path / "out")
    cfg["stages"] = [cfg["stages"][0], stage]
    with pytest.raises(ConfigError) as err:
        compresspipe.load_pipeline(cfg)
    assert message in str(err.value)


def test_torch_export_of_an_int8_model_is_refused_before_running(tmp_path):
    cfg = tiny_pipeline(tmp_path / "out")
    cfg["stages"] = [cfg["stages"][0], {"name": "q", "ptq": {}},
                     {"export": {"formats": ["onnx", "torch_export"], "opset": 18}}]
    with pytest.raises(ConfigError) as err:
        compresspipe.load_pipeline(cfg)
    text = str(err.value)
    assert "stages[2].export.formats: torch_export: the model of stage 'q' is deployed as an " \
           "int8 ONNX file" in text
    assert "stages[2].export.opset" in text


def test_a_failed_onnx_export_is_one_plain_line(monkeypatch, tmp_path):
    """torch's exporter colours its messages; the error a user and MLflow see has no escapes."""
    def fails(*args, **kwargs):
        raise RuntimeError("Failed to decompose the FX graph. \x1b[96mThis is step 2/3\x1b[0m of "
                           "exporting the model.\nTraceback detail")

    monkeypatch.setattr(torch.onnx, "export", fails)
    with pytest.raises(CompressPipeError) as info:
        export_unfused(nn.Linear(2, 2), torch.zeros(1, 2), tmp_path / "m.onnx")
    assert str(info.value) == ("ONNX export of the model failed: RuntimeError: Failed to "
                               "decompose the FX graph. This is step 2/3 of exporting the model.")


def test_maxvit_exports_and_onnxruntime_gives_its_outputs(tmp_path):
    """MaxViT's window attention: traced with CPU's fused SDPA kernel, its views did not fit
    the strides of the exporter's decomposition ("Cannot view a tensor with shape ...")."""
    model = timm.create_model("test_maxvit", num_classes=10, img_size=64, in_chans=1).eval()
    x = torch.randn(2, 1, 64, 64)
    path = export_unfused(model, x, tmp_path / "maxvit.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-3, atol=1e-4)
