"""Pruning-as-Search: binary gates with straight-through gradients, the MACs term, removal."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_pipeline
from test_structured import SHAPE, build
from torch import nn

import compresspipe
from compresspipe.compress.structured.allocate import remove_units
from compresspipe.compress.structured.cost import CostModel
from compresspipe.compress.structured.graph import StructuredGraph
from compresspipe.compress.structured.pas import BinaryGate, PaSHook, auto_gate_scale
from compresspipe.core.errors import ConfigError
from compresspipe.core.measure import count_macs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gate_binarises_and_passes_gradients_straight_through():
    gate = BinaryGate(4, scale=5.0)
    with torch.no_grad():
        gate.raw.copy_(torch.tensor([0.9, 0.3, 0.5, -0.2]) / 5.0)
    b = gate.binary()
    assert b.tolist() == [1.0, 0.0, 0.0, 0.0]  # (v > 0.5), v = 0.5 is off
    (b * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    # identity through the threshold, also for gates that are off; times the storage scale
    assert gate.raw.grad.tolist() == pytest.approx([5.0, 10.0, 15.0, 20.0])


def _randomise_norms(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics, scales and shifts (timm zero-initialises the last BN scale of
    every residual block): a gate placed before a BN would not zero a channel."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)


@pytest.mark.parametrize("family", ["resnet", "mobilenetv3", "efficientnet", "convnext", "vit"])
def test_gated_model_equals_model_with_channels_removed(family):
    model, _ = build(family, seed=1)
    _randomise_norms(model, 0)
    graph = StructuredGraph(model, SHAPE, need_gateable=True)
    cost = CostModel(graph)
    search = PaSHook(graph, cost, p=0.5, alpha=0.1)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for gate in search.gates:
            off = torch.rand(len(gate.raw), generator=generator) < 0.4
            off[0] = False  # every group keeps a unit
            gate.raw[off] = 0.2 / gate.scale
    x = torch.randn(2, 1, 32, 32)
    search.install()
    with torch.no_grad():
        gated = model(x)
        ratio = float(search.macs_ratio())
    search.remove()
    allocation = search.removals("search", max_ratio=0.9)
    assert sum(len(r) for r in allocation.removals) > 0
    dense_macs = count_macs(model, SHAPE)["macs"]
    remove_units(graph, allocation.removals)
    with torch.no_grad():
        pruned = model(x)
    assert torch.allclose(gated, pruned, atol=1e-4, rtol=1e-4), (gated - pruned).abs().max()
    # the MACs the loss sees are the MACs of the network after removal, exactly
    assert ratio * dense_macs == pytest.approx(count_macs(model, SHAPE)["macs"], abs=1.0)


def test_searchable_groups_exclude_layernorm_mixing():
    model, _ = build("convnext")
    graph = StructuredGraph(model, SHAPE, need_gateable=True)
    assert graph.groups and all(".mlp.fc1" in g.name for g in graph.groups)
    assert any("LayerNorm" in r for r in graph.skipped.values())


def test_macs_term_pulls_every_gate_down_and_ce_reaches_the_gates():
    model, _ = build("resnet")
    _randomise_norms(model, 1)
    graph = StructuredGraph(model, SHAPE, need_gateable=True)
    search = PaSHook(graph, CostModel(graph), p=0.3, alpha=0.1)
    x, y = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = search.extra_loss(model, x, torch.zeros(4, 10), y)["macs"]
    gates = sum(g.units for g in graph.groups)
    assert float(loss.detach()) == pytest.approx(0.1 * gates / 10 * 0.3**2)
    loss.backward()
    assert all(bool((gate.raw.grad > 0).all()) for gate in search.gates)
    for gate in search.gates:
        gate.raw.grad = None
        with torch.no_grad():
            gate.raw[:4] = 0.0  # off: the straight-through gradient still reaches them
    search.install()
    nn.functional.cross_entropy(model(x), y).backward()
    search.remove()
    # (a channel whose activations are all zero after a ReLU gets none, as with any weight)
    reached = torch.cat([gate.raw.grad[:4] != 0 for gate in search.gates]).float().mean()
    assert reached > 0.6


def _pas_pipeline(tmp_path, **pas) -> dict:
    cfg = tiny_pipeline(tmp_path / "out", epochs=2)
    cfg["data"].update(limit_train=512, limit_test=128)
    pas = {"p": 0.5, "search": {"epochs": 2, "lr": 0.05}, "finetune": {"epochs": 1, "lr": 0.01},
           "latency": None, **pas}
    cfg["stages"] = [cfg["stages"][0], {"name": "pas", "pas": pas}]
    cfg["tracking"] = {"enabled": False}
    return cfg


def test_pas_stage_meets_the_macs_budget_and_reports_widths(tmp_path):
    summary = compresspipe.run(_pas_pipeline(tmp_path))
    out = tmp_path / "out" / "pas"
    record = json.loads((out / "artifact.json").read_text())["meta"]["structured"]["pas"]
    assert abs(record["macs"] - 0.5 * record["macs_before"]) <= 0.02 * 0.5 * record["macs_before"]
    assert record["predicted"]["macs"] == record["macs"]
    widths = record["searched_widths"]
    assert widths and all(0 <= w["kept"] <= w["total"] for w in widths)
    assert (out / "layer_widths.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["stages"][-1]["metrics"]["params"] == record["params_after"]
    reloaded = compresspipe.load(out).model
    assert count_macs(reloaded, (1, 1, 16, 16))["macs"] == record["macs"]


def test_pas_search_budget_keeps_exactly_the_open_gates(tmp_path):
    compresspipe.run(_pas_pipeline(tmp_path, budget="search", finetune=None))
    record = json.loads((tmp_path / "out" / "pas" / "artifact.json").read_text())
    info = record["meta"]["structured"]["pas"]
    searched = {w["group"]: w for w in info["searched_widths"]}
    layers = record["spec"]["structure"]["layers"]
    for name, w in searched.items():
        if w["kept"] < w["total"]:
            assert layers[name]["out"] == w["kept"], name
    assert info["searched_macs_ratio"] == pytest.approx(info["macs"] / info["macs_before"],
                                                        abs=0.02)


def test_pas_config_problems_name_the_place(tmp_path):
    cfg = _pas_pipeline(tmp_path, ignore=["*"])
    with pytest.raises(ConfigError, match=r"stages\[1\]\.pas\.ignore.*no channel group"):
        compresspipe.pipeline.loader.load_pipeline(cfg)
    cfg = _pas_pipeline(tmp_path, p=1.2)
    with pytest.raises(ConfigError, match=r"stages\[1\]\.pas\.p"):
        compresspipe.pipeline.loader.load_pipeline(cfg)


def _lenet_search(p: float = 0.5) -> PaSHook:
    from compresspipe.zoo import lenet_5

    graph = StructuredGraph(lenet_5(image_size=16), (1, 1, 16, 16), need_gateable=True)
    return PaSHook(graph, CostModel(graph), p=p, alpha=0.1, gate_scale=None)


def test_budget_alone_shuts_no_channel_in_the_first_quarter_of_the_search():
    # LeNet-5: a conv1 channel costs ~100x the MACs of an fc1 unit. Calibrated on the mean pull,
    # the budget shut conv2 to one channel in the 4th of 40 steps, before the cross-entropy
    # could rank a single channel; calibrated on the strongest pull, it takes ~40% of the search.
    search = _lenet_search()
    steps, lr = 40, 0.01
    trainer = SimpleNamespace(total_steps=steps, lr_fn=lambda step, total: lr,
                              cfg=SimpleNamespace(optimizer="sgd", momentum=0.9))
    scale = auto_gate_scale(search, trainer)
    for gate in search.gates:
        gate.scale = scale
        with torch.no_grad():
            gate.raw.fill_(1.0 / scale)
    opt = torch.optim.SGD(search.gates.parameters(), lr=lr, momentum=0.9)
    for step in range(steps // 2):
        opt.zero_grad()
        search.extra_loss(None, None, torch.zeros(1), None)["macs"].backward()
        opt.step()
        shut = sum(int((gate.v <= 0.5).sum()) for gate in search.gates)
        assert shut == 0 or step >= steps // 4, f"step {step + 1}: {shut} channels shut"
    assert shut > 0  # and it does pull: within half the search


def test_exact_budget_keeps_the_searched_proportions():
    # gate values of different groups are not comparable (each group's pull differs); meeting
    # the budget must scale what the search chose, not re-rank raw values across groups
    search = _lenet_search(p=0.5)
    with torch.no_grad():
        for gate, values in zip(search.gates, _searched_values(search), strict=True):
            gate.raw.copy_(values / gate.scale)
    allocation = search.removals("exact", max_ratio=0.9)
    target = 0.5 * search.dense_macs
    assert target * 0.97 <= allocation.predicted["macs"] <= target
    searched = [int((g.v > 0.5).sum()) for g in search.gates]
    kept = [g.units - len(r) for g, r in zip(search.graph.groups, allocation.removals,
                                              strict=True)]
    ratios = [k / s for k, s in zip(kept, searched, strict=True)]
    assert max(ratios) - min(ratios) < 0.15, (kept, searched)
    for gate, removed in zip(search.gates, allocation.removals, strict=True):
        keep = torch.ones(len(gate.v), dtype=torch.bool)
        keep[removed] = False
        if keep.any() and (~keep).any():  # a kept unit never has a weaker gate than a removed one
            assert gate.v[keep].min() >= gate.v[~keep].max()


def _searched_values(search: PaSHook) -> list[torch.Tensor]:
    """The convolutions' channels all open, just above the threshold (where a strong pull leaves
    them); fc1's units at 1.0, half of them shut."""
    out = []
    for g in search.graph.groups:
        v = torch.full((g.units,), 0.6)
        if g.name == "fc1":
            v[: g.units // 2] = 1.0
            v[g.units // 2:] = 0.0
        out.append(v)
    return out
