"""Pruning-as-Search (Li et al., IJCAI 2022): learn every group's width with binary gates.

A depthwise binary 1x1 gate (DBC) sits after each prunable block: one value v per channel (per
head for attention), initialised to 1, multiplying the block's output by (v > 0.5) in the
forward pass and passing the gradient straight through to v. Training minimises

    CE + alpha * ((MACs(gates) - (1 - p) * MACs_dense) / MACs_dense)^2

where MACs(gates) is the exact MAC count of the network with the gated-off channels removed
(``structured.CostModel``), a differentiable function of the binarised gates. Counting MACs as
a fraction of the dense count makes the term independent of the network's size: with the public
code's alpha = 0.1 the budget's pull on a gate is of the order of the cross-entropy's gradient
on it (both about 1e-3 per gate on a trained ResNet), so neither drowns the other.

Gates are stored as v / ``gate_scale``: the optimiser then moves them gate_scale^2 times faster
than a weight under SGD (gate_scale times under Adam) without changing that balance, so a search
of a few epochs can turn channels off.

Gates are forward hooks, not new layers: the model's own modules and names stay, and the gates
are the training hook's extra modules (optimised and checkpointed with the model). A gate sits
where zeroing a channel is the same as removing it: after the BatchNorm that follows a
convolution (or after the convolution / linear layer itself), and before an attention
projection for heads. Groups whose channels pass through a LayerNorm are not searched (a zero
channel would still shift the norm's statistics).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..training import TrainHook
from .structured import _BATCHNORM, _CONV, Allocation, allocate

if TYPE_CHECKING:
    from .structured import ChannelGroup, CostModel, StructuredGraph

THRESHOLD = 0.5


class BinaryGate(nn.Module):
    """A DBC's weights: one value v per unit (stored as v / scale, initially v = 1); forward
    value (v > 0.5), gradient straight through."""

    def __init__(self, units: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.raw = nn.Parameter(torch.full((units,), 1.0 / scale))

    @property
    def v(self) -> torch.Tensor:
        return self.raw * self.scale

    def binary(self) -> torch.Tensor:
        v = self.v
        hard = (v > THRESHOLD).to(v.dtype)
        return hard + v - v.detach()  # forward: hard; backward: identity

    @torch.no_grad()
    def clamp_(self) -> None:
        self.raw.clamp_(0.0, 1.0 / self.scale)


def _gate_points(graph: StructuredGraph, g: ChannelGroup) -> list[tuple[nn.Module, torch.Tensor]]:
    """(module whose output is gated, root channel of each of its output channels; -1 where the
    group does not govern the channel)."""
    points: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    for it in g.items:
        target = it.dep.target.module
        if not isinstance(target, (*_CONV, nn.Linear)) or not graph.is_out(it.dep.handler):
            continue
        node = graph.dg.module2node[target]
        follow = node.outputs[0].module if len(node.outputs) == 1 else None
        # gating after the BatchNorm makes a gated channel exactly zero (BN would add its shift)
        point = follow if isinstance(follow, _BATCHNORM) else target
        width = target.out_channels if isinstance(target, _CONV) else target.out_features
        roots = torch.full((width,), -1, dtype=torch.long)
        roots[torch.tensor(it.idxs, dtype=torch.long)] = torch.tensor(it.root_idxs,
                                                                      dtype=torch.long)
        points[id(point)] = (point, roots)
    return list(points.values())


class PaSHook(TrainHook):
    """The search as a training hook: gates in the forward pass, the MACs term in the loss."""

    def __init__(self, graph: StructuredGraph, cost: CostModel, p: float, alpha: float,
                 gate_scale: float = 10.0):
        self.graph, self.cost, self.p, self.alpha = graph, cost, p, alpha
        self.gates = nn.ModuleList(BinaryGate(g.units, gate_scale) for g in graph.groups)
        self.dense_macs = float(cost.evaluate()["macs"])
        self._handles: list = []

    def modules(self) -> dict[str, nn.Module]:
        return {"pas_gates": self.gates}

    # -- gates in the forward pass ----------------------------------------------------------

    def keeps(self) -> list[torch.Tensor]:
        """Per group, the binarised gate over root channels (heads expand to head_dim)."""
        return [gate.binary().repeat_interleave(g.unit)
                for g, gate in zip(self.graph.groups, self.gates, strict=True)]

    def install(self) -> None:
        """Attach the gates to the model (idempotent)."""
        if self._handles:
            return
        for g, gate in zip(self.graph.groups, self.gates, strict=True):
            if g.kind == "heads":
                self._handles.append(g.root.register_forward_pre_hook(_head_gate(gate, g.unit)))
                continue
            for module, roots in _gate_points(self.graph, g):
                channel_dim = -1 if isinstance(module, nn.Linear) else 1
                self._handles.append(module.register_forward_hook(
                    _channel_gate(gate, roots, channel_dim)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- TrainHook ----------------------------------------------------------------------------

    def on_train_start(self, trainer) -> None:
        self.install()

    def macs_ratio(self) -> torch.Tensor:
        """MACs of the gated network as a fraction of the dense MACs (differentiable)."""
        return self.cost.evaluate(self.keeps())["macs"] / self.dense_macs

    def extra_loss(self, model, inputs, outputs, targets) -> dict[str, torch.Tensor]:
        gap = self.macs_ratio() - (1.0 - self.p)
        return {"macs": self.alpha * gap.to(outputs.device) ** 2}

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        # gates stay in [0, 1], so a gated-off channel can come back within a few steps
        for gate in self.gates:
            gate.clamp_()

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        metrics["search_macs_ratio"] = float(self.macs_ratio())
        metrics["search_channels_off"] = float(sum(int((gate.v <= THRESHOLD).sum())
                                                   for gate in self.gates))

    # -- the searched widths -------------------------------------------------------------------

    @torch.no_grad()
    def searched_widths(self) -> list[dict]:
        return [{"group": g.name, "kind": g.kind, "kept": int((gate.v > THRESHOLD).sum()),
                 "total": g.units} for g, gate in zip(self.graph.groups, self.gates, strict=True)]

    @torch.no_grad()
    def removals(self, budget: str, max_ratio: float) -> Allocation:
        """What to remove: the gated-off units (``search``), or the units ranked by gate value
        until the MACs budget is met (``exact``; the search's choice where it met the budget)."""
        values = [gate.v.detach().float().cpu() for gate in self.gates]
        target_value = (1.0 - self.p) * self.dense_macs
        if budget == "exact":
            # ties (gates clamped at 0 or 1) are broken by position, consistently per group
            scores = [v - 1e-6 * torch.arange(len(v)) / max(len(v), 1) for v in values]
            return allocate(self.graph, self.cost, scores, "macs", target_value, "global",
                            max_ratio=max_ratio)
        removals = []
        for v in values:
            off = torch.nonzero(v <= THRESHOLD).flatten()
            if len(off) == len(v):  # a group keeps at least its strongest unit
                off = off[off != torch.argmax(v)]
            removals.append(off)
        return Allocation(removals, self.cost.evaluate_removals(removals), target_value)


def _channel_gate(gate: BinaryGate, roots: torch.Tensor, channel_dim: int):
    governed = roots >= 0
    index = torch.where(governed, roots, torch.zeros_like(roots))

    def hook(module, inputs, output):
        b = gate.binary()
        g = torch.where(governed.to(b.device), b[index.to(b.device)], torch.ones_like(b[:1]))
        shape = [1] * output.dim()
        shape[channel_dim] = -1
        return output * g.view(shape)

    return hook


def _head_gate(gate: BinaryGate, head_dim: int):
    def hook(module, inputs):
        g = gate.binary().repeat_interleave(head_dim)
        return (inputs[0] * g, *inputs[1:])

    return hook
