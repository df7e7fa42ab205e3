"""Shared fixtures: a tiny, fast pipeline (timm's test_resnet on 16x16 digits)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def tiny_pipeline(out: Path, epochs: int = 2, **extra) -> dict:
    """A pipeline dict that trains in about a second."""
    cfg = {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(out),
        "model": {"name": "test_resnet"},
        "data": {"name": "digits", "image_size": 16, "batch_size": 64},
        "stages": [
            {"name": "dense", "train": {"epochs": epochs, "lr": 0.05, "warmup_epochs": 0.5}},
            {"name": "finetune", "train": {"epochs": 1, "lr": 0.01, "schedule": "constant"}},
        ],
    }
    cfg.update(extra)
    return cfg


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m compresspipe ARGS`` in a fresh process; tests/ importable for test stages."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "compresspipe", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **kwargs)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: two threads on a shared two-core machine spin-wait on
    every small op, and timings (latency metrics) stay steadier."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _no_stage_cache(monkeypatch):
    # two runs of one test share a tmp_path and so a stage cache: a test that compares or kills
    # runs must run every stage; tests of the cache delete this variable
    monkeypatch.setenv("COMPRESSPIPE_NO_CACHE", "1")


@pytest.fixture(autouse=True)
def _no_ambient_tracking_uri():
    # a developer's own MLFLOW_TRACKING_URI must not receive test runs, and mlflow's
    # set_tracking_uri (which sets the variable) in one test must not leak into the next
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved
