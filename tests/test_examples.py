"""Every example pipeline validates against the real model, and runs end to end with tiny
settings (same stages and architecture; 16x16 images, data subsets, one epoch, few rounds), so
no example can rot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import shipped_model_bytes

from compresspipe.cli import quickstart_path
from compresspipe.core.idx import missing_message
from compresspipe.pipeline.loader import load_pipeline
from compresspipe.pipeline.runner import run_pipeline


def _example(path: Path):
    """An example as a test parameter, skipped (with the install line) where it reads a data set
    this machine lacks: CI installs Fashion-MNIST (.ci/run), a laptop may not have it."""
    data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    name = data.get("name")
    missing = (missing_message(name, None) if name in ("mnist", "fashion_mnist")
               and not data.get("root") else None)
    return pytest.param(path, id=path.stem, marks=pytest.mark.skipif(
        missing is not None, reason=missing or ""))


PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.yaml"))
EXAMPLES = [_example(p) for p in PIPELINES]
TINY_DATA = {"image_size": 16, "batch_size": 32, "limit_train": 96, "limit_test": 48, "limit_val": 48,
             "workers": 0}
# key -> value at any depth of a stage's resolved config; applied only where the key is set
TINY = {"warmup_epochs": 0, "rounds": 2, "steps": 1, "calibration_batches": 1,
        "latency_repeats": 0, "latency": None, "kmeans_iters": 5, "taylor_batches": 1,
        "score_batches": 1, "synflow_rounds": 2, "sparse_epochs": 1, "redense_epochs": 1,
        "total_epochs": 2, "dense_epochs": 1, "start_epoch": 0, "end_epoch": None,
        "freeze_bn_after": 0, "freeze_observers_after": 1}


def _shrink(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        if key in TINY and value is not None:
            out[key] = None if TINY[key] is None else min(value, TINY[key])
        elif isinstance(value, dict):
            out[key] = _shrink(value)
        else:
            out[key] = value
    if "epochs" in cfg:
        # one epoch; two where a freeze must happen before the end (qat)
        out["epochs"] = min(cfg["epochs"], 2 if out.get("freeze_observers_after") else 1)
    return out


def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [o for k in new for o in _diff(old.get(k), new[k], f"{path}.{k}")]
    return [] if old == new else [f"{path}={json.dumps(new)}"]  # JSON is YAML


def tiny_overrides(path: Path, out: Path) -> list[str]:
    """--set overrides that make a pipeline run in seconds: every stage keeps its type and
    architecture, but trains one epoch on a few 16x16 images, with few rounds and no timing."""
    pipeline = load_pipeline(path, check_model=False)
    overrides = [f"output_dir={out}", "tracking.enabled=false", "device=cpu"]
    overrides += [f"data.{k}={v}" for k, v in TINY_DATA.items()]
    if "image_size" in (pipeline.config.model.kwargs or {}):  # the zoo's LeNets are told it
        overrides.append(f"model.kwargs.image_size={TINY_DATA['image_size']}")
    for spec in pipeline.stages:
        config = spec.config.model_dump(mode="json")
        overrides += _diff(config, _shrink(config), f"stages.{spec.index}.{spec.type}")
    return overrides


def test_quickstart_is_the_embedded_default():
    assert Path(quickstart_path()).read_text() == (PIPELINES[0].parent / "quickstart.yaml").read_text()


@pytest.mark.parametrize("path", EXAMPLES)
def test_example_validates(path):
    pipeline = load_pipeline(path)
    assert pipeline.stages


@pytest.mark.parametrize("path", EXAMPLES)
def test_example_runs_end_to_end(path, tmp_path):
    pipeline = load_pipeline(path, tiny_overrides(path, tmp_path / "run"))
    summary = run_pipeline(pipeline)
    assert summary["status"] == "finished"
    names = [s["name"] for s in summary["stages"]]
    assert names == ["input"] + [s.name for s in pipeline.stages]
    for record in summary["stages"]:
        m = record["metrics"]
        assert 0 <= m["test_top1"] <= 100 and m["model_bytes"] > 0
        assert m["model_bytes"] == shipped_model_bytes(
            tmp_path / "run" / record["name"], record["model_files"], tmp_path / record["name"])


def test_tiny_overrides_keep_architecture_and_shrink_work(tmp_path):
    path = PIPELINES[0].parent / "int8.yaml"
    overrides = tiny_overrides(path, tmp_path)
    assert "stages.2.qat.epochs=2" in overrides and "stages.2.qat.freeze_bn_after=0" in overrides
    assert "stages.1.ptq.calibration_batches=1" in overrides
    tiny = load_pipeline(path, overrides, check_model=False)
    assert tiny.config.model == load_pipeline(path, check_model=False).config.model
    assert [s.config.epochs for s in tiny.stages if hasattr(s.config, "epochs")] == [1, 2]
