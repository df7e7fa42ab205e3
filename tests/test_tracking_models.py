"""MLflow as its users see a pipeline: datasets as run inputs, one logged model per stage with its
metrics and lineage, the registered version with its alias, the model loaded with
mlflow.pyfunc, used as a teacher, and served by ``mlflow models serve`` on localhost.

One tiny pipeline (1 epoch of test_resnet on 256 16x16 digits, then huffman), run once per
module; the model server is started once too."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from conftest import tiny_pipeline
from harness import ModelServer
from mlflow.tracking import MlflowClient
from torch.utils.data import Subset

import compresspipe
from compresspipe.compress.distill.config import DistillConfig
from compresspipe.core.artifact import Artifact
from compresspipe.core.config import DataConfig, ModelConfig
from compresspipe.core.data import build_data
from compresspipe.core.errors import ConfigError
from compresspipe.core.models import build_model
from compresspipe.formats.cpz_model import read_model_cpz
from compresspipe.pipeline.checkpoints import local_model_config
from compresspipe.pipeline.mlflow_models import ModelTracking
from compresspipe.stages.teacher import load_teacher
from compresspipe.tracking.datasets import describe_data
from compresspipe.tracking.pyfunc import INFO_FILE, save_mlflow_model
from compresspipe.tracking.tracker import process_tracking_uri

NAME, ALIAS = "tiny-digits", "champion"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("models") / "out"
    cfg = tiny_pipeline(out, epochs=1)
    cfg["data"]["limit_train"] = 256  # a second of training; the test split stays whole
    cfg["stages"] = [cfg["stages"][0], {"name": "huffman", "huffman": {}}]
    # the default tracking.model_files: files for the compressed (and the registered) stage,
    # dense's fp32 model points at its directory
    cfg["tracking"] = {"register": {"name": NAME, "alias": ALIAS}}
    summary = compresspipe.run(cfg)
    store = summary["tracking_uri"]
    pipeline = compresspipe.load_pipeline(cfg, check_model=False)
    return summary, MlflowClient(store, registry_uri=store), store, pipeline


@pytest.fixture(scope="module")
def test_images():
    data = build_data(DataConfig(name="digits", image_size=16, batch_size=64))
    x = torch.stack([data.test[i][0] for i in range(len(data.test))]).numpy()
    y = np.array([int(data.test[i][1]) for i in range(len(data.test))])
    return x, y


@pytest.fixture(scope="module")
def served(finished, tmp_path_factory):
    """``mlflow models serve -m models:/NAME@ALIAS`` started once for the module."""
    _, _, store, _ = finished
    with ModelServer(tmp_path_factory.mktemp("serve"), f"models:/{NAME}@{ALIAS}",
                     store) as server:
        yield server


def load_registered(store: str):
    """``mlflow.pyfunc.load_model('models:/NAME@ALIAS')`` against the test's store (the
    process-wide URI restored afterwards)."""
    with process_tracking_uri(store):
        return mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}")


def test_every_run_lists_the_data_it_saw(finished):
    summary, client, _, _ = finished
    contexts = {}
    for run_id, stage in [(summary["parent_run_id"], "pipeline"),
                          *((r["run_id"], r["name"]) for r in summary["stages"][1:])]:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        contexts[stage] = sorted(t.value for d in inputs for t in d.tags
                                 if t.key == "mlflow.data.context")
        for d in inputs:
            assert d.dataset.name == "digits"
            assert json.loads(d.dataset.source)["uri"].endswith("digits.csv.gz")
            profile = json.loads(d.dataset.profile)
            if profile["split"] != "validation":  # a validation split, where the data has one
                assert profile["num_rows"] == {"train": 256, "test": 360}[profile["split"]]
            assert len(profile["source_sha256"]) == 64
    # the dense stage trained (and validated, where there is a validation split) and was
    # evaluated; huffman was only evaluated
    assert contexts["pipeline"] == contexts["dense"]
    assert set(contexts["dense"]) - {"validation"} == {"test", "train"}
    assert contexts["huffman"] == ["test"]
    inputs = client.get_run(summary["parent_run_id"]).inputs.dataset_inputs
    assert len({d.dataset.digest for d in inputs}) == len(inputs)  # the splits differ


def test_one_logged_model_per_stage_with_metrics_and_lineage(finished):
    summary, client, _, _ = finished
    dense, huffman = summary["stages"][1:]
    for record in (dense, huffman):
        model = client.get_logged_model(record["model_id"])
        assert model.name == record["name"] and model.source_run_id == record["run_id"]
        assert str(model.status) in ("READY", "LoggedModelStatus.READY")
        linked = {m.key: m for m in model.metrics}
        for key in ("test_top1", "test_loss", "deployed_val_top1", "model_bytes",
                    "compression_ratio", "sparsity", "bits_per_weight"):
            assert linked[key].value == pytest.approx(record["metrics"][key])
        assert linked["test_top1"].dataset_name == "digits"
        assert "wall_time_s" not in linked  # run metrics only
        run_outputs = client.get_run(record["run_id"]).outputs.model_outputs
        assert [o.model_id for o in run_outputs] == [record["model_id"]]
    lineage = client.get_logged_model(huffman["model_id"]).tags
    assert lineage["compresspipe.source_model_id"] == dense["model_id"]
    assert lineage["compresspipe.parent_stage"] == "dense"
    assert lineage["compresspipe.deploy_format"] == "cpz"


def test_logged_model_holds_the_deployable_only(finished):
    summary, client, _, _ = finished
    huffman = summary["stages"][2]
    local = mlflow.artifacts.download_artifacts(
        client.get_logged_model(huffman["model_id"]).artifact_location,
        tracking_uri=finished[2])
    files = sorted(p.name for p in (Path(local) / "data" / "deployable").iterdir())
    assert files == sorted([*huffman["model_files"], INFO_FILE])
    assert "model.safetensors" not in files


def test_registered_version_tags_and_alias(finished):
    summary, client, _, _ = finished
    huffman = summary["stages"][2]
    version = client.get_model_version_by_alias(NAME, ALIAS)
    assert summary["registered"] == {"name": NAME, "version": str(version.version), "alias": ALIAS,
                                     "model_id": huffman["model_id"],
                                     "uri": f"models:/{NAME}@{ALIAS}"}
    assert version.source == f"models:/{huffman['model_id']}"  # the UI links it so
    assert float(version.tags["ratio"]) == pytest.approx(
        huffman["metrics"]["compression_ratio"], rel=1e-5)
    assert float(version.tags["test_top1"]) == pytest.approx(huffman["metrics"]["test_top1"],
                                                       rel=1e-5)
    assert version.tags["pipeline"] == "tiny"
    assert version.tags["fingerprint"] == huffman["fingerprint"]
    assert {"sparsity", "bits_per_weight"} <= set(version.tags)


def test_pyfunc_predictions_are_the_reported_accuracy(finished, test_images):
    summary, _, store, _ = finished
    x, y = test_images
    model = load_registered(store)
    logits = model.predict(x)
    assert logits.shape == (len(y), 10) and logits.dtype == np.float32
    top1 = 100.0 * float((logits.argmax(1) == y).mean())
    assert top1 == pytest.approx(summary["stages"][2]["metrics"]["test_top1"], abs=1e-6)
    # the same network the .cpz decodes to
    decoded = read_model_cpz(summary["output_dir"] + "/huffman/model.cpz").model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(decoded(torch.from_numpy(x)).numpy(), logits, atol=1e-5)


def test_registered_model_as_teacher(finished, test_images):
    summary, _, _, pipeline = finished
    teacher = load_teacher(DistillConfig(teacher=f"models:/{NAME}@{ALIAS}"), pipeline.config)
    x, y = test_images
    with torch.no_grad():
        top1 = 100.0 * float((teacher(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert top1 == pytest.approx(summary["stages"][2]["metrics"]["test_top1"], abs=1e-6)


def test_registered_model_as_starting_checkpoint(finished, test_images):
    """model.checkpoint: models:/NAME@ALIAS starts a pipeline from the registered weights: the
    checks load them and the input stage is the registered model (same predictions)."""
    summary, _, store, pipeline = finished
    cfg = tiny_pipeline(pipeline.config.resolved_output_dir().parent / "from_registry", epochs=1)
    cfg["model"]["checkpoint"] = f"models:/{NAME}@{ALIAS}"
    cfg["tracking"] = {"uri": store}
    loaded = compresspipe.load_pipeline(cfg)  # the model checks read the fetched weights
    model, _ = build_model(local_model_config(loaded.config), loaded.config.data)
    x, y = test_images
    with torch.no_grad():
        top1 = 100.0 * float((model.eval()(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert top1 == pytest.approx(summary["stages"][-1]["metrics"]["test_top1"], abs=1e-6)
    cfg["model"]["checkpoint"] = f"models:/{NAME}@no-such-alias"
    with pytest.raises(ConfigError, match=r"model\.checkpoint"):
        compresspipe.load_pipeline(cfg)


def test_served_model_answers_like_the_reported_model(finished, served, test_images):
    x, _ = test_images
    batch = x[:32]
    model = load_registered(finished[2])
    answer = served.invocations({"inputs": batch.tolist()})
    np.testing.assert_allclose(np.asarray(answer["predictions"], np.float32),
                               model.predict(batch), atol=1e-4)


def test_register_stage_must_exist(tmp_path):
    cfg = tiny_pipeline(tmp_path / "out", tracking={"register": {"name": "m", "stage": "dense2"}})
    with pytest.raises(ConfigError, match=r"tracking\.register\.stage.*'dense2'.*did you mean"):
        compresspipe.load_pipeline(cfg, check_model=False)
    with pytest.raises(ConfigError, match="reserved"):
        compresspipe.load_pipeline(tiny_pipeline(tmp_path / "out", tracking={
            "register": {"name": "m", "alias": "v3"}}), check_model=False)


def test_an_fp32_stage_model_points_at_its_stage_by_default(finished):
    summary, client, _, _ = finished
    dense = summary["stages"][1]
    model = client.get_logged_model(dense["model_id"])
    assert model.tags["mlflow.model.isExternal"] == "true"
    assert model.tags["compresspipe.stage_dir"] == str(Path(summary["output_dir"]) / "dense")
    assert client.list_logged_model_artifacts(dense["model_id"]) == []


def test_the_deployable_is_logged_once(finished):
    """The .cpz is in the huffman stage's logged model, not again in its run's artifacts;
    the run's pointer names the model."""
    summary, client, _, _ = finished
    huffman = summary["stages"][2]
    logged = [f.path for f in client.list_artifacts(huffman["run_id"], "artifact")]
    assert "artifact/model.cpz" not in logged and "artifact/pointer.json" in logged
    pointer = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=huffman["run_id"], artifact_path="artifact/pointer.json",
        tracking_uri=finished[2])).read_text())
    assert pointer["deployable"] == f"models:/{huffman['model_id']}"
    assert Path(pointer["directory"]) == Path(summary["output_dir"]) / "huffman"


@pytest.mark.parametrize(("mode", "register", "expected"), [
    ("compressed", None, [False, False, True]), ("compressed", "dense", [True, False, True]),
    ("all", None, [True, True, True]), ("none", None, [False, False, False]),
    ("none", "finetune", [False, True, False]), (True, None, [True, True, True]),
    (False, None, [False, False, False])])
def test_which_logged_models_hold_files(tmp_path, mode, register, expected):
    """tracking.model_files: by default files for a deployable smaller than the input model's
    (a 4x smaller one here), pointers for fp32 intermediates; the registered stage always."""
    tracking = {"model_files": mode}
    if register:
        tracking["register"] = {"name": "m", "stage": register}
    cfg = tiny_pipeline(tmp_path, tracking=tracking)
    cfg["stages"].append({"name": "last", "train": {"epochs": 1}})
    pipeline = compresspipe.load_pipeline(cfg, check_model=False)
    models = ModelTracking(None, pipeline.config, [s.name for s in pipeline.stages], tmp_path)
    stages = [{"name": n, "metrics": {"model_bytes": b}} for n, b in
              [("input", 4000), ("dense", 4000), ("finetune", 4000), ("last", 1000)]]
    assert [models.holds_files(r, stages) for r in stages[1:]] == expected


def test_plain_stage_as_an_mlflow_model(tmp_path):
    """A stage whose deployable is model.safetensors: the flavour rebuilds it from its spec."""
    model, spec = build_model(ModelConfig(name="test_resnet"),
                              DataConfig(name="digits", image_size=16))
    Artifact(model=model, spec=spec).save(tmp_path / "stage")
    x = torch.randn(5, 1, 16, 16)
    save_mlflow_model(tmp_path / "mlflow", tmp_path / "stage", None, spec, x[:2].numpy(), 10)
    assert sorted(p.name for p in (tmp_path / "mlflow" / "data" / "deployable").iterdir()) == \
        [INFO_FILE, "model.safetensors"]
    loaded = mlflow.pyfunc.load_model(str(tmp_path / "mlflow"))
    with torch.no_grad():
        np.testing.assert_allclose(loaded.predict(x.numpy()), model.eval()(x).numpy(), atol=1e-5)


def test_dataset_digests_follow_the_split_contents():
    """A validation split carved from train gets its own record and digest; other
    preprocessing (image size) gives other digests; the same data the same ones."""
    data = build_data(DataConfig(name="fake", image_size=8, train_size=64, test_size=16))
    data.val = Subset(data.train, range(48, 64))
    data.train = Subset(data.train, range(48))
    records = describe_data(data)
    assert sorted(records) == ["test", "train", "validation"]
    assert [records[s].size for s in ("train", "validation", "test")] == [48, 16, 16]
    assert len({r.digest for r in records.values()}) == 3
    again = describe_data(build_data(DataConfig(name="fake", image_size=8, train_size=64,
                                                test_size=16)))
    assert again["test"].digest == records["test"].digest
    other = describe_data(build_data(DataConfig(name="fake", image_size=12, train_size=64,
                                                test_size=16)))
    assert other["test"].digest != records["test"].digest
    assert records["validation"].entity().source_type == "code"
