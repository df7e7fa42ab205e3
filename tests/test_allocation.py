"""Allocation rules of one global sparsity target: every rule hits the target exactly, keeps
the min_layer_keep floor, never revives a pruned weight; ERK, LAMP and sensitivity allocate as
their papers say; cluster bits under a bytes budget meet the budget."""

from __future__ import annotations

import math
import typing

import pytest
import torch
from torch import nn

from compresspipe.compress.pruning.allocation import (
    AllocationInput,
    allocate,
    allocation_names,
    lamp_scores,
    monotone_curve,
    sparsity_within,
)
from compresspipe.compress.pruning.config import AllocationRule, PruneConfig
from compresspipe.compress.pruning.scopes import compute_masks, floor_bound, select_targets
from compresspipe.compress.quant.cluster import bits_under_budget, clustered_bytes


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1),
                         nn.Flatten(), nn.Linear(16, 64), nn.Linear(64, 10))


def _curves(model: nn.Module) -> dict[str, list[tuple[float, float]]]:
    # a made-up scan: later layers are more sensitive
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return {n: [(s, (i + 1) * s ** 2) for s in (0.25, 0.5, 0.75, 0.9)] for i, n in enumerate(names)}


def test_rules_are_the_config_literal():
    assert set(typing.get_args(AllocationRule)) == set(allocation_names())


@pytest.mark.parametrize("rule", ["uniform", "global", "erk", "lamp", "sensitivity"])
@pytest.mark.parametrize("sparsity", [0.3, 0.77, 0.93])
def test_each_rule_hits_the_global_target_exactly(rule, sparsity):
    model = _model()
    targets = select_targets(model, [], [], "include", "include", {}, min_keep=0.05)
    targets.allocation, targets.curves = rule, _curves(model)
    params = dict(model.named_parameters())
    scores = {n: params[n].detach().abs() for n in targets.names}
    masks = compute_masks(scores, targets, sparsity, "global")
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == round(sparsity * total)
    for name, m in masks.items():  # the floor: ≥ 5% of every layer, at least one weight
        assert int(m.sum()) >= max(1, math.ceil(0.05 * m.numel())), name


@pytest.mark.parametrize("rule", ["uniform", "erk", "lamp", "sensitivity", "global"])
def test_pruned_weights_stay_pruned_across_rounds(rule):
    model = _model()
    targets = select_targets(model, [], [], "include", "include", {}, min_keep=0.01)
    targets.allocation, targets.curves = rule, _curves(model)
    params = dict(model.named_parameters())
    scores = {n: params[n].detach().abs() for n in targets.names}
    first = compute_masks(scores, targets, 0.5, "global")
    second = compute_masks({n: torch.rand_like(s) for n, s in scores.items()}, targets, 0.8,
                           "global", previous=first)
    total = sum(m.numel() for m in second.values())
    assert sum(int((~m).sum()) for m in second.values()) == round(0.8 * total)
    for name in first:
        assert not (second[name] & ~first[name]).any(), f"{name}: a pruned weight came back"


@pytest.mark.parametrize("rule", ["global", "erk", "lamp"])
def test_floor_binds_everywhere_at_99_and_is_reported(rule):
    # the floors (5% of each layer, rounded up) keep more than 1% of the pool: every layer
    # keeps exactly its floor, none less, and floor_bound names them all
    model = _model()
    targets = select_targets(model, [], [], "include", "include", {}, min_keep=0.05)
    targets.allocation = rule
    params = dict(model.named_parameters())
    masks = compute_masks({n: params[n].detach().abs() for n in targets.names}, targets, 0.99,
                          "global")
    assert floor_bound(masks, targets) == targets.names
    assert all(int(m.sum()) == max(1, math.ceil(0.05 * m.numel())) for m in masks.values())


def test_erk_densities_follow_the_formula():
    shapes = {"a": (64, 32, 3, 3), "b": (256, 512), "c": (10, 16)}
    inp = AllocationInput(names=list(shapes), scores={n: torch.rand(s) for n, s in shapes.items()},
                          shapes=shapes, floors=dict.fromkeys(shapes, 0), keep_total=0)
    n = {k: math.prod(s) for k, s in shapes.items()}
    inp.keep_total = int(0.1 * sum(n.values()))
    keep = allocate("erk", inp)
    density = {k: keep[k] / n[k] for k in shapes}
    # the small classifier's ERK density would exceed 1: it stays dense, the others re-scale
    assert keep["c"] == n["c"]
    ratio = density["a"] / density["b"]
    expected = (sum(shapes["a"]) / n["a"]) / (sum(shapes["b"]) / n["b"])
    assert ratio == pytest.approx(expected, rel=1e-2)
    assert sum(keep.values()) == inp.keep_total


def test_lamp_score_is_square_over_the_sum_of_larger_squares():
    w = torch.tensor([3.0, -1.0, 2.0, -math.inf])
    got = lamp_scores(w)
    assert got[1] == pytest.approx(1 / (1 + 4 + 9))
    assert got[2] == pytest.approx(4 / (4 + 9))
    assert got[0] == pytest.approx(1.0)  # the largest weight of a layer is always 1
    assert got[3] == -math.inf


def test_sensitivity_gives_the_sensitive_layer_less_sparsity():
    shapes = {"robust": (100, 100), "sensitive": (100, 100)}
    curves = {"robust": [(0.5, 0.01), (0.8, 0.02), (0.95, 0.2)],
              "sensitive": [(0.5, 0.3), (0.8, 1.5), (0.95, 4.0)]}
    inp = AllocationInput(names=list(shapes), scores={n: torch.rand(s) for n, s in shapes.items()},
                          shapes=shapes, floors=dict.fromkeys(shapes, 1), keep_total=8000,
                          curves=curves)
    keep = allocate("sensitivity", inp)
    assert sum(keep.values()) == 8000
    assert keep["sensitive"] > keep["robust"]
    # equal loss slope: both layers sit at (about) the same loss increase
    sparsity = {k: 1 - keep[k] / 10000 for k in keep}
    tau = [_interp(curves[k], sparsity[k]) for k in keep]
    assert tau[0] == pytest.approx(tau[1], abs=0.02)


def _interp(curve, s):
    c = monotone_curve(curve)
    for (s0, d0), (s1, d1) in zip(c, c[1:]):
        if s0 <= s <= s1:
            return d0 + (s - s0) / (s1 - s0) * (d1 - d0)
    return c[-1][1]


def test_sparsity_within_inverts_a_monotone_curve():
    c = monotone_curve([(0.5, 1.0), (0.7, 0.5), (0.9, 3.0)])  # the dip is noise: clamped
    assert c == [(0.0, 0.0), (0.5, 1.0), (0.7, 1.0), (0.9, 3.0)]
    assert sparsity_within(c, 0.5) == pytest.approx(0.25)
    assert sparsity_within(c, 1.0) == pytest.approx(0.7)
    assert sparsity_within(c, 10.0) == pytest.approx(0.9)


def test_prune_config_allocation_forms():
    assert PruneConfig(allocation="erk").allocation.rule == "erk"
    cfg = PruneConfig(allocation={"rule": "sensitivity", "scan": "stage:sens"})
    assert cfg.allocation.scan == "stage:sens"
    with pytest.raises(ValueError, match="scope 'global'"):
        PruneConfig(allocation="lamp", scope="layer")
    with pytest.raises(ValueError, match="scan applies"):
        PruneConfig(allocation={"rule": "erk", "scan": "stage:sens"})


def test_cluster_bits_meet_a_bytes_budget_where_loss_is_cheapest():
    shapes = {"big": 64 * 64 * 9, "small": 10 * 64}  # weights each layer stores
    scan = {"big": [(2, 0.5), (3, 0.2), (4, 0.05), (5, 0.01), (6, 0.0), (8, 0.0)],
            "small": [(2, 3.0), (3, 1.0), (4, 0.3), (5, 0.1), (6, 0.02), (8, 0.0)]}
    full = clustered_bytes(shapes, dict.fromkeys(shapes, 8))
    budget = int(0.5 * full)
    bits = bits_under_budget(shapes, scan, budget, choices=[2, 3, 4, 5, 6, 8])
    assert clustered_bytes(shapes, bits) <= budget
    assert bits["small"] >= bits["big"]  # bytes are cheapest to save where loss barely rises
    uniform = bits_under_budget(shapes, None, budget, choices=[2, 3, 4, 5, 6, 8])
    assert len(set(uniform.values())) == 1 and clustered_bytes(shapes, uniform) <= budget
    with pytest.raises(ValueError, match="budget"):
        bits_under_budget(shapes, scan, 10, choices=[2, 3, 4])
