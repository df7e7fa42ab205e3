"""Pruning-as-Search (Li et al., IJCAI 2022): learn every group's width with binary gates.

A depthwise binary 1x1 gate (DBC) sits on every prunable channel group where the block's output
enters the next layer: one value v per channel (per head for attention), initialised to 1,
multiplying the channel by (v > 0.5) in the forward pass and passing the gradient straight
through to v. Training minimises

    CE + alpha * (N / 10) * ((MACs(gates) - (1 - p) * MACs_dense) / MACs_dense)^2

where MACs(gates) is the exact MAC count of the network with the gated-off channels removed
(``cost.CostModel``), a differentiable function of the binarised gates, and N the number
of gates. Normalisation: MACs as a fraction of the dense count make the term independent of the
network's size; one gate's share of that fraction is about 2/N (MACs are bilinear in the
widths), so the factor N keeps the budget's pull on a single gate from fading as networks get
wider. The remaining constant 1/10 was measured: with it the public code's alpha = 0.1 pulls a
gate about as hard as the cross-entropy of a trained network does (ResNet, MobileNetV3 and
EfficientNet on digits reached half their MACs within 4 epochs of search, within 1-5% of the
budget); ten times more pull cost MobileNetV3 16 points of accuracy after fine-tuning, and
without the factor N the search stopped at 73-97% of the MACs.
Each group keeps its strongest gate open so that the search never disconnects the network.

Gates are stored as v / ``gate_scale``: the optimiser then moves them gate_scale^2 times faster
than a weight under SGD (gate_scale times under Adam) without changing that balance. By default
the scale is set from the search's own length, learning rate and optimiser so that the budget
alone would move the *most* pulled gate across the threshold and back once (travel 1) within the
first half of the search (``auto_gate_scale``). The pull on a gate is its channel's share of the
MACs and differs ~100x between a stem channel and a unit of a fully connected layer; calibrating
on the mean pull (as before) let the expensive gates travel tens of times that far, and LeNet-5's
two convolutions shut to one channel each within eight steps (searched MACs 1.3% of dense against
a 50% budget) before the cross-entropy could defend a single channel.

Meeting the budget exactly (``budget: exact``) keeps the searched widths' proportions: every
group keeps its strongest round(f * searched width) units, one factor f for all groups found by
bisection. Ranking raw gate values across groups (as before) compared numbers whose scale is set
by each group's pull, not by what the search chose, and cut channels that were open through the
whole search.

Not implemented: the paper's structural re-parameterisation (residual branches folded
RepVGG-style so that each block's width is free). Channels joined by a residual add are one
group here and share one width, so on ResNets this is PaS without re-parameterisation; on plain
chains (LeNet-5, VGG) nothing differs. The gates also share the weights' optimiser group (its
momentum and weight decay; the decay shrinks v by the fraction lr * wd per step, as a weight).

Gates are forward hooks, not new layers: the model's own modules and names stay, and the gates
are the training hook's extra modules (optimised and checkpointed with the model). A group's
gate multiplies the input of every convolution and linear layer that reads the group's channels
(for heads: the attention projection's input), which is exactly what removing the channels does,
and keeps the straight-through gradient of a closed gate alive (a gate before a ReLU would see
relu'(0) = 0). Groups whose channels reach a LayerNorm are not searched: the norm mixes
channels, so a gated channel would still shift its statistics.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ...core.errors import CompressPipeError
from ...core.structure import CONV
from ...core.training import TrainHook
from .allocate import Allocation
from .cost import CostModel
from .graph import ChannelGroup, StructuredGraph, is_depthwise

THRESHOLD = 0.5
PULL_PER_GATE = 0.1  # the MACs term is scaled by N * this (see the module docstring)
BUDGET_TOLERANCE = 0.02  # 'exact' may stop this far above the MACs budget when floors bind


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
        # the strongest unit stays open: a group never disconnects the network
        hard = hard.index_fill(0, torch.argmax(v.detach()).view(1), 1.0)
        return hard + (v - v.detach())  # forward: exactly hard; backward: identity


def _gate_points(graph: StructuredGraph, g: ChannelGroup) -> list[tuple[nn.Module, torch.Tensor]]:
    """(convolution or linear layer reading the group's channels, root channel of each of its
    input channels; -1 where the group does not govern the channel)."""
    points: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    for it in g.items:
        target = it.dep.target.module
        if (not isinstance(target, (*CONV, nn.Linear)) or graph.is_out(it.dep.handler)
                or is_depthwise(target)):
            continue
        width = target.in_channels if isinstance(target, CONV) else target.in_features
        roots = points.get(id(target), (target, torch.full((width,), -1, dtype=torch.long)))[1]
        roots[torch.tensor(it.idxs, dtype=torch.long)] = torch.tensor(it.root_idxs,
                                                                      dtype=torch.long)
        points[id(target)] = (target, roots)
    return list(points.values())


class PaSHook(TrainHook):
    """The search as a training hook: gates in the forward pass, the MACs term in the loss."""

    def __init__(self, graph: StructuredGraph, cost: CostModel, p: float, alpha: float,
                 gate_scale: float | None = 1.0):
        self.graph, self.cost, self.p, self.alpha = graph, cost, p, alpha
        self.auto_scale = gate_scale is None
        self.gates = nn.ModuleList(BinaryGate(g.units, gate_scale or 1.0) for g in graph.groups)
        self.dense_macs = float(cost.evaluate()["macs"])
        self.n_gates = sum(g.units for g in graph.groups)
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
                self._handles.append(module.register_forward_pre_hook(
                    _channel_gate(gate, roots, channel_dim)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- TrainHook ----------------------------------------------------------------------------

    def on_train_start(self, trainer) -> None:
        if self.auto_scale:
            scale = auto_gate_scale(self, trainer)
            for gate in self.gates:
                if trainer.start_epoch == 0:  # a resumed search restores its own gate values
                    with torch.no_grad():
                        gate.raw.fill_(1.0 / scale)
                gate.scale = scale
            self.gate_scale = scale
        self.install()

    def initial_pulls(self) -> torch.Tensor:
        """|d(MACs term)/d gate| of every gate with every gate open: how hard the budget pulls
        on each at first (in the groups' order)."""
        opens = [torch.ones(g.units, requires_grad=True) for g in self.graph.groups]
        keeps = [o.repeat_interleave(g.unit) for o, g in zip(opens, self.graph.groups, strict=True)]
        gap = self.cost.evaluate(keeps)["macs"] / self.dense_macs - (1.0 - self.p)
        loss = self.alpha * self.n_gates * PULL_PER_GATE * gap**2
        grads = torch.autograd.grad(loss, opens)
        return torch.cat(grads).abs().detach()

    def macs_ratio(self) -> torch.Tensor:
        """MACs of the gated network as a fraction of the dense MACs (differentiable)."""
        return self.cost.evaluate(self.keeps())["macs"] / self.dense_macs

    def extra_loss(self, model, inputs, outputs, targets) -> dict[str, torch.Tensor]:
        gap = self.macs_ratio() - (1.0 - self.p)
        term = self.alpha * self.n_gates * PULL_PER_GATE * gap**2
        return {"macs": term.to(outputs.device, outputs.dtype)}

    @torch.no_grad()
    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        metrics["search_macs_ratio"] = float(self.macs_ratio())
        metrics["search_channels_off"] = float(sum(int((gate.v <= THRESHOLD).sum())
                                                   for gate in self.gates))

    # -- the searched widths -------------------------------------------------------------------

    @torch.no_grad()
    def searched_widths(self) -> list[dict]:
        return [{"group": g.name, "kind": g.kind, "kept": int(gate.binary().sum()),
                 "total": g.units} for g, gate in zip(self.graph.groups, self.gates, strict=True)]

    @torch.no_grad()
    def removals(self, budget: str, max_ratio: float) -> Allocation:
        """What to remove: the gated-off units (``search``), or the units ranked by gate value
        until the MACs budget is met (``exact``; the search's choice where it met the budget)."""
        values = [gate.v.detach().float().cpu() for gate in self.gates]
        target_value = (1.0 - self.p) * self.dense_macs
        if budget == "exact":
            return self._proportional(values, target_value, max_ratio)
        removals = []
        for v in values:
            off = torch.nonzero(v <= THRESHOLD).flatten()
            if len(off) == len(v):  # a group keeps at least its strongest unit
                off = off[off != torch.argmax(v)]
            removals.append(off)
        return Allocation(removals, self.cost.evaluate_removals(removals), target_value)

    def _proportional(self, values: list[torch.Tensor], target_value: float,
                      max_ratio: float) -> Allocation:
        """The searched widths scaled by one factor f until the MACs budget is met: each group
        keeps its round(f * searched width) strongest units, at least max(1, (1 - max_ratio)
        of its units) and at most all of them; f is the largest that meets the budget."""
        searched = [max(int((v > THRESHOLD).sum()), 1) for v in values]
        floors = [max(1, math.ceil(len(v) * (1 - max_ratio))) for v in values]
        # ties (gates clamped at 0 or 1) broken by position, consistently per group
        orders = [torch.argsort(v, descending=True, stable=True) for v in values]

        def removals_at(f: float) -> list[torch.Tensor]:
            return [o[min(len(o), max(floor, round(f * k))):]
                    for o, k, floor in zip(orders, searched, floors, strict=True)]

        def macs(f: float) -> float:
            return self.cost.evaluate_removals(removals_at(f))["macs"]

        lo, hi = 0.0, max(len(v) / k for v, k in zip(values, searched, strict=True))
        if macs(lo) > target_value * (1 + BUDGET_TOLERANCE):
            raise CompressPipeError(
                f"pas: cannot reach {target_value:,.0f} MACs with every group keeping at least "
                f"1 - max_layer_ratio ({1 - max_ratio:.2f}) of its units ({macs(lo):,.0f} "
                "MACs remain); raise max_layer_ratio or lower p")
        if macs(hi) <= target_value:
            lo = hi
        for _ in range(40):  # the largest f that meets the budget
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if macs(mid) <= target_value else (lo, mid)
        removals = _fill(removals_at(lo), [len(v) for v in values], searched, target_value,
                         lambda r: self.cost.evaluate_removals(r)["macs"])
        return Allocation(removals, self.cost.evaluate_removals(removals), target_value)


def _fill(removals: list[torch.Tensor], units: list[int], searched: list[int],
          target_value: float, macs) -> list[torch.Tensor]:
    """Give back single units while the budget holds, the group furthest below its searched
    proportion first: one stem channel can be several percent of the MACs, so the bisection's
    common factor may leave the network well under the budget."""
    removals = list(removals)
    while True:
        order = sorted((i for i, r in enumerate(removals) if r.numel()),
                       key=lambda i: (units[i] - len(removals[i])) / searched[i])
        for i in order:
            trial = removals.copy()
            trial[i] = removals[i][1:]  # the strongest removed unit comes back
            if macs(trial) <= target_value:
                removals = trial
                break
        else:
            return removals


def auto_gate_scale(search: PaSHook, trainer, travel: float = 1.0) -> float:
    """The gate storage scale with which the budget's initial pull alone would move the most
    pulled gate by ``travel`` (twice the way to the threshold) in the first half of the search,
    given the search's own optimiser and learning-rate schedule. Deterministic, so a resumed
    search reads its checkpointed gates with the same scale."""
    half = max(trainer.total_steps // 2, 1)
    lr_sum = sum(trainer.lr_fn(step, trainer.total_steps) for step in range(half))
    pull = float(search.initial_pulls().max())
    if lr_sum <= 0 or pull <= 0:
        return 1.0
    if trainer.cfg.optimizer == "sgd":
        # SGD with momentum m moves a parameter by lr * grad / (1 - m) per step; a stored
        # value v / s moves v by s^2 times that
        return math.sqrt(travel * (1 - trainer.cfg.momentum) / (pull * lr_sum))
    return travel / lr_sum  # Adam-type steps are about lr whatever the gradient's size


def _channel_gate(gate: BinaryGate, roots: torch.Tensor, channel_dim: int):
    governed = roots >= 0
    index = torch.where(governed, roots, torch.zeros_like(roots))

    def hook(module, inputs):
        b = gate.binary()
        g = torch.where(governed.to(b.device), b[index.to(b.device)], torch.ones_like(b[:1]))
        x = inputs[0]
        shape = [1] * x.dim()
        shape[channel_dim] = -1
        return (x * g.view(shape), *inputs[1:])

    return hook


def _head_gate(gate: BinaryGate, head_dim: int):
    def hook(module, inputs):
        g = gate.binary().repeat_interleave(head_dim)
        return (inputs[0] * g, *inputs[1:])

    return hook
