"""compresspipe.zoo: the LeNets of Deep Compression's table, built through a pipeline's factory
reference; IMP rounds take per-layer override rates step by step."""

from __future__ import annotations

import pytest
import torch

from compresspipe.compress.pruning.scopes import scheduled_overrides
from compresspipe.core.config import DataConfig, ModelConfig
from compresspipe.core.models import build_model
from compresspipe.zoo import lenet_5, lenet_300_100


@pytest.mark.parametrize(("factory", "params"), [(lenet_300_100, 266_610), (lenet_5, 431_080)])
def test_lenets_have_the_papers_sizes(factory, params):
    # Han et al.: 1070 KB and 1720 KB of fp32 weights
    model = factory()
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_zoo_factory_from_a_pipeline_model_block():
    model, spec = build_model(
        ModelConfig(factory="compresspipe.zoo:lenet_5", kwargs={"image_size": 16}),
        DataConfig(name="digits", image_size=16))
    assert spec["kwargs"] == {"image_size": 16, "in_chans": 1, "num_classes": 10}
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="at least 16 px"):
        lenet_5(image_size=8)


def test_scheduled_overrides_follow_the_overall_pace():
    rates = {"a": 0.92, "b": 0.74}
    half = 1 - (1 - 0.9) ** 0.5  # halfway along 90% in log-density
    got = scheduled_overrides(rates, half, 0.9)
    assert got["a"] == pytest.approx(1 - 0.08 ** 0.5)
    assert got["b"] == pytest.approx(1 - 0.26 ** 0.5)
    assert scheduled_overrides(rates, 0.9, 0.9) == rates

