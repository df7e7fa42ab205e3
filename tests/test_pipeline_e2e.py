"""End to end: a tiny pipeline on a real sqlite MLflow store, checked against files on disk."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_pipeline, write_yaml
from mlflow.tracking import MlflowClient

import compresspipe
from compresspipe.core.artifact import Artifact
from compresspipe.core.store import TensorStore, manifest_objects


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "out"
    summary = compresspipe.run(tiny_pipeline(out))
    return out, summary


def _runs(summary):
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    return client, parent, {r.info.run_name: r for r in children}


def test_summary_lists_every_stage(finished):
    out, summary = finished
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["status"] == "finished"
    assert [s["name"] for s in on_disk["stages"]] == ["input", "dense", "finetune"]
    assert summary["tracking_uri"] == f"sqlite:///{out / 'mlflow.db'}"
    dense = on_disk["stages"][1]["metrics"]
    assert dense["test_top1"] > 50.0  # two epochs on digits learn something real
    assert {"deployed_val_top1", "deployed_val_loss", "test_top1", "test_top5", "test_loss", "params", "nonzero_params", "sparsity", "model_bytes",
            "artifact_bytes", "bits_per_weight", "compression_ratio", "wall_time_s"} <= set(dense)


def test_parent_and_nested_runs(finished):
    _, summary = finished
    _, parent, children = _runs(summary)
    assert parent.info.status == "FINISHED"
    assert set(children) == {"dense", "finetune"}
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["dense"].data.params["epochs"] == "2"
    assert children["dense"].data.tags["compresspipe.stage_type"] == "train"


def test_logged_metrics_equal_summary(finished):
    _, summary = finished
    _, parent, children = _runs(summary)
    for record in summary["stages"][1:]:
        logged = children[record["name"]].data.metrics
        for key, value in record["metrics"].items():
            assert logged[key] == pytest.approx(value, rel=1e-12, abs=0), key
    final = summary["stages"][-1]["metrics"]
    assert parent.data.metrics["final.test_top1"] == final["test_top1"]
    assert parent.data.metrics["input.model_bytes"] == summary["stages"][0]["metrics"]["model_bytes"]


def test_logged_bytes_equal_file_sizes(finished, tmp_path):
    out, summary = finished
    _, _, children = _runs(summary)
    store = TensorStore(out.parent / ".compresspipe-cache")
    for record in summary["stages"]:
        directory = out / record["name"]
        files = [directory / f for f in record["model_files"]]
        if not all(f.is_file() for f in files):
            # an fp32 model's tensors are in the store: the file it ships as is written anew
            Artifact(**_model_and_spec(directory)).save(tmp_path / record["name"])
            files = [tmp_path / record["name"] / f for f in record["model_files"]]
        model_bytes = sum(f.stat().st_size for f in files)
        assert record["metrics"]["model_bytes"] == model_bytes
        own = {p.name: p.stat().st_size for p in directory.iterdir() if p.name != "metrics.json"}
        stored = store.object_bytes(manifest_objects(directory / "tensors.json"))
        assert record["metrics"]["artifact_bytes"] == sum(own.values()) + stored
        assert record["files"] == own
        if record["name"] in children:
            assert children[record["name"]].data.metrics["model_bytes"] == model_bytes
    ref = summary["stages"][0]["metrics"]["model_bytes"]
    last = summary["stages"][-1]["metrics"]
    assert last["compression_ratio"] == pytest.approx(ref / last["model_bytes"])


def _model_and_spec(directory):
    loaded = compresspipe.load(directory)
    return {"model": loaded.model, "spec": loaded.spec}


def test_per_epoch_curves_and_artifacts(finished):
    out, summary = finished
    client, parent, children = _runs(summary)
    history = client.get_metric_history(children["dense"].info.run_id, "val_top1")
    assert [m.step for m in history] == [1, 2]
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "summary.md", "size_vs_accuracy.png",
            "pipeline.resolved.yaml"} <= names
    stage_files = {a.path for a in client.list_artifacts(children["dense"].info.run_id, "artifact")}
    # the deployable files, the metadata and a pointer to the stored tensors, not a copy of them
    assert {"artifact/tensors.json", "artifact/pointer.json", "artifact/artifact.json"} <= stage_files
    # artifacts live beside the database, not in the caller's working directory
    assert (out / "mlartifacts").is_dir()
    assert (out / "size_vs_accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_failed_stage_marks_runs_failed(tmp_path):
    cfg = tiny_pipeline(tmp_path / "out", epochs=1)
    cfg["stages"].append({"stages_for_tests:Boom": {"message": "planned failure"}})
    with pytest.raises(RuntimeError, match="planned failure"):
        compresspipe.run(cfg)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["status"] == "failed"
    client, parent, children = _runs(summary)
    assert parent.info.status == "FAILED"
    statuses = {r.info.run_name: r.info.status for r in children.values()}
    assert statuses == {"dense": "FINISHED", "finetune": "FINISHED",
                        "stages_for_tests_Boom": "FAILED"}


def test_mask_revival_is_caught(tmp_path):
    cfg = tiny_pipeline(tmp_path / "out", epochs=1)
    cfg["stages"] = [
        {"name": "prune", "stages_for_tests:ZeroHalf": {}},
        {"name": "train", "train": {"epochs": 1}},
        {"name": "revive", "stages_for_tests:Revive": {}},
    ]
    with pytest.raises(compresspipe.core.errors.MaskViolation, match="fc.weight"):
        compresspipe.run(cfg)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # training after pruning kept the mask; only the reviving stage failed
    assert [s["name"] for s in summary["stages"]] == ["input", "prune", "train"]
    assert summary["stages"][2]["metrics"]["nonzero_params"] < summary["stages"][0]["metrics"]["params"]


def test_same_seed_same_metrics(tmp_path):
    a = compresspipe.run(tiny_pipeline(tmp_path / "a", epochs=1, tracking={"enabled": False}))
    b = compresspipe.run(tiny_pipeline(tmp_path / "b", epochs=1, tracking={"enabled": False}))
    # wall times differ, and artifact.json embeds earlier stages' wall times in its lineage
    strip = ("wall_time_s", "artifact_bytes")
    for ra, rb in zip(a["stages"], b["stages"], strict=True):
        assert {k: v for k, v in ra["metrics"].items() if k not in strip} == \
               {k: v for k, v in rb["metrics"].items() if k not in strip}


def test_cli_run_prints_table(tmp_path):
    from conftest import run_cli

    path = write_yaml(tmp_path / "p.yaml", tiny_pipeline(tmp_path / "out", epochs=1))
    result = run_cli("run", str(path), "--set", "stages.1.train.epochs=1")
    assert result.returncode == 0, result.stderr
    assert "| dense | train |" in result.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in result.stdout
