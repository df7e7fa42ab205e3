"""Uniform quantization with a trained step (compress/quant/uniform, cluster's codebook: uniform)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_pipeline

import compresspipe
from compresspipe.compress.quant.cluster import CentroidHook, cluster_model
from compresspipe.compress.quant.uniform import fit_step, uniform_levels, uniform_weight
from compresspipe.core.errors import ConfigError
from compresspipe.pipeline.loader import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _step(layer) -> float:
    top = int(layer.levels.max())
    return float(layer.codebook[int(torch.argmax(layer.levels))]) / top


def _is_grid(layer) -> bool:
    """codebook == levels * step (up to float32 rounding of the step read back)."""
    return torch.allclose(layer.codebook.double(), layer.levels.double() * _step(layer),
                          rtol=1e-6, atol=0)


def test_levels_keep_index_zero_for_the_pruned_weights():
    assert uniform_levels(3, masked=True).tolist() == [0, -3, -2, -1, 1, 2, 3, 4]
    assert uniform_levels(3, masked=False).tolist() == [-3, -2, -1, 0, 1, 2, 3, 4]
    assert uniform_levels(8, masked=True).numel() == 256


def test_masked_layer_is_an_exact_grid_with_zero_only_for_pruned_weights():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    mask = w.abs() > 0.7
    layer = uniform_weight("w", w * mask, bits=5, mask=mask)
    assert layer.codebook.numel() == 32 and layer.codebook[0] == 0.0 and _is_grid(layer)
    assert torch.equal(layer.indices == 0, ~mask)  # a survivor never becomes a new zero
    rebuilt = layer.weight()
    step = _step(layer)
    inside = mask & (w.abs() <= 15 * step)
    assert ((rebuilt - w)[inside].abs() <= step / 2 + 1e-6).all()  # nearest level, no clipping
    assert int(layer.indices.max()) < 31  # the spare code is never used


def test_unmasked_layer_has_zero_as_an_ordinary_level():
    torch.manual_seed(0)
    w = torch.randn(40, 30) * 0.1
    layer = uniform_weight("w", w, bits=4, mask=None)
    assert layer.zero_index is None and _is_grid(layer)
    assert (layer.weight() == 0).any()  # the weights nearest zero take the zero level
    err = (layer.weight() - w).square().sum()
    no_clip = w.abs().max() / 7
    j = torch.clamp(torch.round(w / no_clip), -7, 7)
    assert err <= (j * no_clip - w).square().sum() + 1e-9  # the fitted step is no worse


def test_fitted_step_minimises_the_error_near_the_optimum():
    torch.manual_seed(1)
    w = torch.randn(20000).double()
    step = fit_step(w, top=7, nonzero=False)

    def err(s):
        return float((w - s * torch.clamp(torch.round(w / s), -7, 7)).square().sum())
    assert err(step) <= min(err(step * 0.97), err(step * 1.03))


def _toy(mask=None):
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 5, bias=False)
    if mask is not None:
        with torch.no_grad():
            layer.weight.mul_(mask)
    layers = cluster_model(layer, {"weight": 4}, {"weight": mask} if mask is not None else {},
                           quantize=uniform_weight)
    return layer, layers["weight"]


def test_sgd_trains_the_step_alone_and_keeps_the_grid():
    """Every weight moves by its level times one amount: SGD on the step, grid kept exactly."""
    mask = torch.rand(5, 12, generator=torch.Generator().manual_seed(1)) > 0.3
    layer, q = _toy(mask)
    x, target = torch.randn(7, 12), torch.randn(7, 5)
    level = q.levels[q.indices].double()
    # the plain gradient, before the hook rewrites it
    raw = torch.autograd.grad(torch.nn.functional.mse_loss(layer(x), target), layer.weight)[0]
    # dL/dstep, scaled as LSQ does: 1 / sqrt(survivors * top level)
    expected = float((raw.double() * level).sum()) / math.sqrt(int(mask.sum()) * 7)
    hook = CentroidHook({"weight": q})
    hook.attach(layer)
    torch.nn.functional.mse_loss(layer(x), target).backward()
    before = _step(q)
    torch.optim.SGD(layer.parameters(), lr=1e-3).step()
    hook.after_step(layer, 1)
    assert _step(q) == pytest.approx(before - 1e-3 * expected, rel=1e-5)
    assert _is_grid(q) and torch.equal(layer.weight.detach(), q.codebook[q.indices])
    assert torch.equal(layer.weight.detach()[~mask], torch.zeros(int((~mask).sum())))
    hook.close()


def test_adamw_steps_are_projected_back_onto_a_grid():
    layer, q = _toy()
    hook = CentroidHook({"weight": q}, reduce="mean")
    hook.attach(layer)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.01, weight_decay=0.1)
    first = _step(q)
    for step in range(5):
        opt.zero_grad()
        layer(torch.randn(4, 12)).pow(2).mean().backward()
        opt.step()
        hook.after_step(layer, step)
    assert _is_grid(q) and _step(q) != first
    assert torch.equal(layer.weight.detach(), q.codebook[q.indices])
    hook.close()


def test_stage_writes_a_uniform_grid_that_the_cpz_reproduces(tmp_path):
    out = tmp_path / "out"
    cfg = tiny_pipeline(out, tracking={"enabled": False})
    cfg["stages"] = [
        {"name": "dense", "train": {"epochs": 2, "lr": 0.05, "warmup_epochs": 0.5}},
        {"name": "prune", "prune": {"sparsity": 0.6, "train": {"epochs": 1, "lr": 0.01}}},
        {"name": "cluster", "cluster": {"codebook": "uniform", "conv_bits": 5, "linear_bits": 4,
                                        "finetune": {"epochs": 1}}},
        {"name": "huffman", "huffman": {}},
    ]
    summary = compresspipe.run(cfg)
    art = compresspipe.load(out / "cluster")
    decoded = dict(compresspipe.load(out / "huffman").deployed_model(out / "huffman")
                   .named_parameters())  # the model decoded from the .cpz
    for name, desc in art.quant["cluster"]["layers"].items():
        codebook = art.extras[f"cluster.{name}.codebook"]
        assert desc["codebook"] == "uniform" and desc["step"] > 0
        top = 2 ** (desc["bits"] - 1) - 1
        grid = codebook[1:2 * top + 1] / desc["step"]  # the real levels, spare left out
        assert torch.allclose(grid, grid.round(), atol=1e-3) and codebook[0] == 0.0
        indices = art.extras[f"cluster.{name}.indices"].long()
        assert torch.equal(indices == 0, ~art.masks[name].bool())  # the masks survived
        assert torch.equal(decoded[name].detach(), codebook[indices])  # coded losslessly
    stages = {s["name"]: s["metrics"] for s in summary["stages"]}
    assert stages["huffman"]["model_bytes"] < stages["cluster"]["model_bytes"] / 2


def test_uniform_needs_two_bits(tmp_path):
    cfg = tiny_pipeline(tmp_path / "out")
    cfg["stages"] = [{"cluster": {"codebook": "uniform", "linear_bits": 1,
                                  "overrides": {"fc": 1}}}]
    with pytest.raises(ConfigError, match=r"codebook 'uniform' needs at least 2 bits \(a zero "
                       r"and ±1\): linear_bits 1, overrides.fc 1"):
        load_pipeline(cfg)
