"""Every example pipeline validates against the real model (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from compresspipe.cli import quickstart_path
from compresspipe.config import load_pipeline

PIPELINES = sorted((Path(__file__).resolve().parents[1] / "pipelines").glob("*.yaml"))


def test_quickstart_is_the_embedded_default():
    assert Path(quickstart_path()).read_text() == (PIPELINES[0].parent / "quickstart.yaml").read_text()


@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_example_validates(path):
    pipeline = load_pipeline(path)
    assert pipeline.stages
