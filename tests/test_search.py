"""Search: a few trials on a tiny MLP complete, write a best pipeline that `compresspipe run`
reproduces, choose on validation metrics only, resume after an interruption, and reject a bad
`search:` section with its YAML path and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_yaml

import compresspipe
from compresspipe.cli import main
from compresspipe.core.errors import CompressPipeError, ConfigError
from compresspipe.pipeline.loader import load_pipeline
from compresspipe.pipeline.search_report import choose, val_top1


def _pipeline(out, trials=3, tracking=False):
    return {
        "name": "searched", "seed": 0, "output_dir": str(out),
        "model": {"factory": "factories_for_tests:mlp", "kwargs": {"hidden": 16}},
        "data": {"name": "digits", "image_size": 8, "batch_size": 128, "limit_train": 256},
        "tracking": {"enabled": tracking},
        "stages": [
            {"name": "dense", "train": {"epochs": 1, "lr": 0.05}},
            {"name": "prune", "prune": {"method": "oneshot", "sparsity": 0.5,
                                        "train": {"epochs": 1, "lr": 0.01}}},
            {"name": "cluster", "cluster": {"conv_bits": 4, "linear_bits": 4,
                                            "finetune": {"epochs": 0}}},
            {"name": "huffman", "huffman": {}},
        ],
        "search": {
            "parameters": {"stages.cluster.cluster.linear_bits": {"low": 2, "high": 6,
                                                                  "step": 1}},
            "objective": {"kind": "min_bytes", "max_val_top1_drop": 50},
            "budget": {"trials": trials},
            "sampler": "random",
        },
    }


@pytest.fixture
def cache_on(monkeypatch, one_thread):
    monkeypatch.delenv("COMPRESSPIPE_NO_CACHE", raising=False)


def _trial_models_point_at_reloadable_directories(client, out, report):
    """A trial's logged models hold no files: they name the trial's stage directory, which
    reloads, and its final .cpz is the size the Pareto report lists."""
    checked = 0
    for row in report["rows"]:
        trial = out / "trials" / str(row["trial"])
        stages = json.loads((trial / "summary.json").read_text())["stages"]
        for record in (r for r in stages if r.get("model_id")):
            model = client.get_logged_model(record["model_id"])
            assert model.tags["mlflow.model.isExternal"] == "true"
            assert client.list_logged_model_artifacts(record["model_id"]) == []
            directory = Path(model.tags["compresspipe.stage_dir"])
            assert directory == (trial / record["name"]).resolve()
            assert compresspipe.load(directory).model is not None
            checked += 1
        cpz = trial / stages[-1]["name"] / "model.cpz"
        assert cpz.stat().st_size == row["bytes"]
        with torch.no_grad():
            assert compresspipe.load(cpz).model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    assert checked >= 2


def test_search_resumes_writes_best_yaml_that_reproduces(tmp_path, cache_on, capsys):
    out = tmp_path / "search"
    path = write_yaml(tmp_path / "s.yaml", _pipeline(out, trials=1, tracking=True))
    assert main(["run", str(path)]) == 0  # an interrupted search: 1 of 3 trials
    path = write_yaml(tmp_path / "s.yaml", _pipeline(out, trials=3, tracking=True))
    assert main(["run", str(path)]) == 0
    assert "1 trials done, 2 to go" in capsys.readouterr().out
    report = json.loads((out / "pareto.json").read_text())
    assert report["completed"] == 3 and len(report["rows"]) == 3
    # the trials after the first reuse input, dense and prune: one stage run per later stage
    assert all(r["stage_runs_executed"] <= 2 for r in report["rows"] if r["trial"] > 0)
    assert (out / "pareto.md").is_file() and (out / "pareto.png").stat().st_size > 0
    best = report["best"]
    chosen = [r for r in report["rows"] if r["test_top1"] is not None]
    assert best in chosen and all(r["pareto"] or r["best"] for r in chosen)

    # MLflow: each trial's run is a child of the search's run
    from mlflow.tracking import MlflowClient

    state = json.loads((out / "search.json").read_text())
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    children = client.search_runs(
        [client.get_run(state["parent_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'")
    assert len({r.data.tags.get("compresspipe.search.trial") for r in children}) == 3
    # a later trial's prune stage was restored from the cache: its run names the first run
    # and its directory, and holds no files (the first run has them), never the tensors
    later = json.loads((out / "trials" / "2" / "summary.json").read_text())["stages"][2]
    first = json.loads((out / "trials" / "0" / "summary.json").read_text())["stages"][2]
    assert later["cached_from_run"] == first["run_id"]
    tags = client.get_run(later["run_id"]).data.tags
    assert tags["compresspipe.cache.reused_from_run"] == first["run_id"]
    assert tags["compresspipe.stage_dir"] == str((out / "trials" / "2" / "prune").resolve())
    assert client.list_artifacts(later["run_id"]) == []
    # a trial's stage run that ran holds a pointer only: its directory keeps the files
    assert [a.path for a in client.list_artifacts(first["run_id"], "artifact")] == [
        "artifact/pointer.json"]
    pointer = Path(client.download_artifacts(first["run_id"], "artifact/pointer.json",
                                             str(tmp_path)))
    assert json.loads(pointer.read_text())["directory"] == str(out / "trials" / "0" / "prune")
    assert "stage_summary.json" not in {a.path for a in client.list_artifacts(first["run_id"])}
    trial_run = json.loads((out / "trials" / "0" / "summary.json").read_text())["parent_run_id"]
    assert [a.path for a in client.list_artifacts(trial_run)] == ["pipeline.resolved.yaml"]
    _trial_models_point_at_reloadable_directories(client, out, report)

    # the best pipeline is a plain file: run without the cache, it gives the same model
    best_file = yaml.safe_load((out / "best.yaml").read_text())
    assert "search" not in best_file
    best_file["tracking"] = {"enabled": False}
    rerun = write_yaml(tmp_path / "best.yaml", best_file)
    assert main(["run", str(rerun), "--no-cache"]) == 0
    final = json.loads((out / "best" / "summary.json").read_text())["stages"][-1]["metrics"]
    assert final["model_bytes"] == best["bytes"]
    assert val_top1(final) == pytest.approx(best["val_top1"])


def test_choice_reads_validation_not_test_accuracy():
    rows = [{"trial": 0, "bytes": 100, "val_top1": 90.0, "val_top1_drop": 0.5},
            {"trial": 1, "bytes": 80, "val_top1": 80.0, "val_top1_drop": 10.5},
            {"trial": 2, "bytes": 90, "val_top1": 89.9, "val_top1_drop": 0.6}]
    for r in rows:  # a test accuracy that would choose otherwise; choose must not read it
        r["test_top1"] = property(lambda self: pytest.fail("test accuracy read"))
    best = choose(rows, max_drop=1.0)
    assert best["trial"] == 2
    assert [r["pareto"] for r in rows] == [True, True, True]
    assert val_top1({"deployed_val_top1": 70.0, "val_top1": 80.0, "test_top1": 99.0}) == 70.0
    with pytest.raises(CompressPipeError, match="val_split"):  # never falls back to test
        val_top1({"test_top1": 60.0})


def test_bad_search_section_names_path_and_line(tmp_path):
    cfg = _pipeline(tmp_path / "o")
    cfg["search"]["parameters"] = {
        "stages.clustr.cluster.linear_bits": {"low": 2, "high": 6, "step": 1},
        "stages.cluster.cluster.linear_bitz": {"choices": [2, 3]},
        "stages.cluster.cluster.conv_bits": {"low": 0, "high": 99, "step": 1},
    }
    path = write_yaml(tmp_path / "bad.yaml", cfg)
    with pytest.raises(ConfigError) as err:
        load_pipeline(path, check_model=False)
    text = str(err.value)
    assert "search.parameters.stages.clustr.cluster.linear_bits" in text
    assert "no stage named 'clustr'" in text and "did you mean 'cluster'" in text.lower()
    assert "no field 'linear_bitz'" in text
    assert "search.parameters.stages.cluster.cluster.conv_bits" in text
    assert "line " in text
