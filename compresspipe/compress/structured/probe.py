"""A dry run of channel removal: which groups break the forward pass when narrowed.

Torch-Pruning slices every layer of a group consistently, but model code may reshape or slice by
a width it reads from an attribute (MobileViTv2's ``split([1, embed_dim, embed_dim])``, an
attention's ``C // num_heads``); narrowing such a group leaves a network that no longer runs.
``breaking_groups`` finds them on a copy, so the real model is never touched: it removes an odd
number of units (about half) of every group at once and runs the network; only when that fails
does it try the groups one by one, starting a fresh copy after each failure.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ...core.structure import AttentionInfo
from .depgraph import BudgetedGraph

# graph.StructuredGraph / graph.ChannelGroup: typed as Any because graph.py imports this module
StructuredGraph = ChannelGroup = Any


def probe_units(g: ChannelGroup) -> list[int]:
    """Units the dry run removes: an odd count near half, so that a width that must stay a
    multiple of something (heads, pairs) shows up; at least one unit stays."""
    count = max(1, g.units // 2) | 1
    return list(range(min(count, g.units - 1)))


class _Copy:
    """A deep copy of the graph's network with its own dependency graph."""

    def __init__(self, graph: StructuredGraph):
        self.model = copy.deepcopy(graph.model).eval()
        self.x = graph.example_input()
        self.dg = BudgetedGraph().build_dependency(self.model, example_inputs=self.x,
                                                   verbose=False)
        self.modules = dict(self.model.named_modules())

    def remove(self, graph: StructuredGraph, g: ChannelGroup) -> None:
        units = probe_units(g)
        if not units:
            return
        root = self.modules[graph.names[g.root]]
        self.dg.get_pruning_group(root, g.root_fn, g.channels_of(torch.tensor(units))).prune()
        if g.attention is not None:
            info = AttentionInfo(g.attention.name, self.modules[g.attention.name])
            info.set_heads(info.heads - len(units))

    @torch.no_grad()
    def output_shape(self) -> tuple[int, ...]:
        return tuple(self.model(self.x).shape)


def breaking_groups(graph: StructuredGraph) -> dict[int, str]:
    """{index in graph.groups: the error} for groups whose narrowing breaks the forward pass
    or changes the output shape."""
    expected = _shape(graph.model, graph.example_input())
    trial = _Copy(graph)
    try:
        for g in graph.groups:
            trial.remove(graph, g)
        if trial.output_shape() == expected:
            return {}
    except Exception:  # noqa: BLE001 - any failure: find the groups one by one
        pass
    bad: dict[int, str] = {}
    trial = _Copy(graph)
    for i, g in enumerate(graph.groups):
        try:
            trial.remove(graph, g)
            shape = trial.output_shape()
            error = None if shape == expected else f"output shape {shape}, expected {expected}"
        except Exception as exc:  # noqa: BLE001 - model code raises anything on a bad width
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        if error is not None:
            bad[i] = error
            trial = _Copy(graph)
    return bad


@torch.no_grad()
def _shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    was_training = model.training
    model.eval()
    try:
        return tuple(model(x).shape)
    finally:
        model.train(was_training)
