"""A dry run of channel removal: which groups break the forward pass when narrowed.

Torch-Pruning slices every layer of a group consistently, but model code may reshape or slice by
a width it reads from an attribute (an attention's ``C // num_heads``, a block that adds its
shortcut to a fixed number of channels); narrowing such a group leaves a network that no longer
runs. ``breaking_groups`` finds them on the graph's own network and puts everything back
afterwards (``_Snapshot``; Torch-Pruning replaces parameters rather than editing them, so keeping
the old objects is enough): it removes an odd number of units (about half) of every group at
once and runs the network; only when that fails does it try the groups one by one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# graph.StructuredGraph / graph.ChannelGroup: typed as Any because graph.py imports this module
StructuredGraph = ChannelGroup = Any


def probe_units(g: ChannelGroup) -> list[int]:
    """Units the dry run removes: an odd count near half, so that a width that must stay a
    multiple of something (heads, pairs) shows up; at least one unit stays."""
    count = max(1, g.units // 2) | 1
    return list(range(min(count, g.units - 1)))


class _Snapshot:
    """Every module's attributes, parameters and buffers, and the dependency graph's maps, as
    they are now; ``restore`` puts them back after a trial removal."""

    def __init__(self, model: nn.Module, dg: Any):
        self.modules = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers))
                        for m in model.modules()]
        self.dg = dg
        self.module2node = dict(dg.module2node)
        self.param_names = dict(dg._param_to_name)
        self.node_modules = [(node, node.module) for node in dg.module2node.values()]

    def restore(self) -> None:
        for m, attrs, params, buffers in self.modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m.__dict__["_parameters"] = dict(params)
            m.__dict__["_buffers"] = dict(buffers)
        self.dg.module2node.clear()
        self.dg.module2node.update(self.module2node)
        self.dg._param_to_name.clear()
        self.dg._param_to_name.update(self.param_names)
        for node, module in self.node_modules:
            node.module = module


def _remove(graph: StructuredGraph, g: ChannelGroup) -> None:
    units = probe_units(g)
    if not units:
        return
    graph.dg.get_pruning_group(g.root, g.root_fn, g.channels_of(torch.tensor(units))).prune(
        record_history=False)
    if g.attention is not None:
        g.attention.set_heads(g.attention.heads - len(units))


def _error(graph: StructuredGraph, groups: list, expected: tuple[int, ...]) -> str | None:
    """Remove units of ``groups`` and run the network: None, or what went wrong."""
    try:
        for g in groups:
            _remove(graph, g)
        shape = forward_shape(graph.model, graph.example_input())
    except Exception as exc:  # noqa: BLE001 - model code raises anything on a bad width
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return None if shape == expected else f"output shape {shape}, expected {expected}"


def breaking_groups(graph: StructuredGraph) -> dict[int, str]:
    """{index in graph.groups: the error} for groups whose narrowing breaks the forward pass
    or changes the output shape; the network is left as it was."""
    expected = forward_shape(graph.model, graph.example_input())
    snapshot = _Snapshot(graph.model, graph.dg)
    bad: dict[int, str] = {}
    try:
        if _error(graph, graph.groups, expected) is None:
            return bad
        snapshot.restore()
        for i, g in enumerate(graph.groups):
            error = _error(graph, [g], expected)
            snapshot.restore()
            if error is not None:
                bad[i] = error
    finally:
        snapshot.restore()
    return bad


@torch.no_grad()
def forward_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """The output shape of one eval-mode forward pass (the training flag put back)."""
    was_training = model.training
    model.eval()
    try:
        return tuple(model(x).shape)
    finally:
        model.train(was_training)
