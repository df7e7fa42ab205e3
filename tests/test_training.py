"""The training loop's pieces: LR schedules, hooks, freezing, optimizer checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compresspipe.core.config import DataConfig, TrainConfig
from compresspipe.core.data import build_data
from compresspipe.core.masks import MaskHook
from compresspipe.core.training import (
    Trainer,
    TrainHook,
    _flatten_optimizer,
    _unflatten_optimizer,
    lr_at,
)


def _lrs(cfg: TrainConfig, steps_per_epoch: int = 10) -> list[float]:
    total = cfg.epochs * steps_per_epoch
    return [lr_at(cfg, s, total, steps_per_epoch) for s in range(total)]


def test_cosine_with_warmup():
    lrs = _lrs(TrainConfig(epochs=10, lr=0.1, schedule="cosine", warmup_epochs=1))
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1)  # peak right after warm-up
    assert lrs[-1] < 1e-3 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_step_linear_constant_onecycle():
    step = _lrs(TrainConfig(epochs=6, lr=0.1, schedule="step", step_size=2, gamma=0.5))
    assert step[0] == step[19] == pytest.approx(0.1) and step[20] == pytest.approx(0.05)
    assert step[40] == pytest.approx(0.025)
    linear = _lrs(TrainConfig(epochs=2, lr=0.1, schedule="linear", min_lr=0.01))
    assert linear[0] == pytest.approx(0.1) and linear[-1] == pytest.approx(0.01 + 0.09 / 20)
    assert set(_lrs(TrainConfig(epochs=2, lr=0.3, schedule="constant"))) == {0.3}
    cycle = _lrs(TrainConfig(epochs=10, lr=0.1, schedule="onecycle"))
    assert cycle[0] == pytest.approx(0.1 / 25)
    assert max(cycle) == pytest.approx(0.1) and cycle.index(max(cycle)) == 30
    assert cycle[-1] < 0.1 / 1000


@pytest.fixture(scope="module")
def digits():
    return build_data(DataConfig(name="digits", image_size=8, batch_size=128, limit_train=256))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_hooks_extra_loss_and_mask(digits):
    calls = {"loss": 0, "steps": 0}

    class Counting(TrainHook):
        def extra_loss(self, model, inputs, outputs, targets):
            calls["loss"] += 1
            return {"l2": 1e-3 * outputs.pow(2).mean()}

        def after_step(self, model, step):
            calls["steps"] = step

    model = _mlp()
    mask = torch.rand_like(model[1].weight) > 0.7
    trainer = Trainer(model, digits, TrainConfig(epochs=2, lr=0.1), device=torch.device("cpu"),
                      seed=0, hooks=[Counting(), MaskHook({"1.weight": mask})])
    history = trainer.fit()
    assert calls["loss"] == calls["steps"] == 2 * trainer.steps_per_epoch == 4
    assert "train_l2" in history[-1] and history[-1]["train_l2"] > 0
    assert torch.count_nonzero(model[1].weight[~mask]) == 0
    assert torch.count_nonzero(model[1].weight[mask]) == mask.sum()


def test_freeze_keeps_parameters(digits):
    model = _mlp()
    before = model[1].weight.detach().clone()
    Trainer(model, digits, TrainConfig(epochs=1, lr=0.1, freeze=["1.*"]),
            device=torch.device("cpu"), seed=0).fit()
    assert torch.equal(model[1].weight, before)
    assert not model[1].weight.requires_grad


def test_optimizer_state_round_trip(digits):
    model = _mlp()
    trainer = Trainer(model, digits, TrainConfig(epochs=1, optimizer="adamw", lr=1e-3),
                      device=torch.device("cpu"), seed=0)
    trainer.fit()
    state = trainer.optimizer.state_dict()
    tensors, skeleton = _flatten_optimizer(state)
    import json

    rebuilt = _unflatten_optimizer(tensors, json.loads(json.dumps(skeleton)))
    assert rebuilt["state"].keys() == state["state"].keys()
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            assert torch.equal(rebuilt["state"][idx][key], value)


def test_diverging_loss_gives_clear_error(digits):
    model = _mlp()
    with torch.no_grad():
        model[1].weight.fill_(math.inf)
    from compresspipe.core.errors import CompressPipeError

    with pytest.raises(CompressPipeError, match="lower the learning rate"):
        Trainer(model, digits, TrainConfig(epochs=1), device=torch.device("cpu"), seed=0).fit()


def test_digits_split_is_fixed_and_stratified():
    data = build_data(DataConfig(name="digits", image_size=16))
    assert (len(data.train), len(data.val), len(data.test)) == (1293, 144, 360)
    labels = torch.stack([y for _, y in data.test])
    assert torch.bincount(labels).min() >= 35  # every class present in proportion
    x, _ = data.train[0]
    assert x.shape == (1, 16, 16)
    again = build_data(DataConfig(name="digits", image_size=16))
    assert torch.equal(torch.stack([x for x, _ in again.test]), torch.stack([x for x, _ in data.test]))
