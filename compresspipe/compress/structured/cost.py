"""Parameters and MACs as an exact, differentiable function of the kept channels.

``CostModel`` measures a graph's network once (one forward pass) and then evaluates parameter,
MAC and channel counts for any per-group keep vectors: a budget is met without trial pruning,
and PaS puts the MACs of its gated network in its loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ...core.measure import count_macs
from ...core.structure import BATCHNORM, CONV
from .graph import StructuredGraph, is_depthwise


@dataclass
class _Slot:
    """One dimension of one layer: which of its channels each group governs."""

    total: int
    segments: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (group, root idxs)

    @property
    def fixed(self) -> int:
        return self.total - sum(len(r) for _, r in self.segments)


class CostModel:
    """Exact parameter and MAC counts of the network after removing channels, as a
    differentiable function of per-group keep vectors (1 = kept). Built from one forward pass:
    convolutions and linear layers cost in x out, depthwise convolutions their channels,
    attention its heads; what it does not model is measured once and held constant."""

    def __init__(self, graph: StructuredGraph):
        self.graph = graph
        self.slots: dict[tuple[int, str], _Slot] = {}
        for gi, g in enumerate(graph.groups):
            for it in g.items:
                target = it.dep.target.module
                if target not in graph.names:  # Torch-Pruning's stand-ins for add, reshape, ...
                    continue
                direction = "out" if graph.is_out(it.dep.handler) else "in"
                key = (id(target), direction)
                if key not in self.slots:
                    self.slots[key] = _Slot(_width(target, direction, graph, it))
                self.slots[key].segments.append((gi, torch.tensor(it.root_idxs, dtype=torch.long)))
        self.layers = self._layer_macs(graph.model, graph.example_input())
        self.params_spec = self._param_spec(graph.model)
        measured = count_macs(graph.model, graph.input_shape)
        self.unmodelled_macs = measured["macs"] - sum(m for m, *_ in self.layers)
        self.dense_keeps = [torch.ones(g.size) for g in graph.groups]
        self._compile()

    # -- building -------------------------------------------------------------------------

    @torch.no_grad()
    def _layer_macs(self, model: nn.Module, x: torch.Tensor) -> list[tuple]:
        """(base MACs, in-slot key, out-slot key, kind) of every conv/linear/attention call."""
        layers: list[tuple] = []
        attention = {a.module: a for a in self.graph.attention.values()}

        def conv_hook(m, inputs, out):
            kernel = math.prod(m.kernel_size) * (m.in_channels // m.groups)
            kind = "depthwise" if is_depthwise(m) else "dense"
            layers.append((out[0].numel() * kernel, (id(m), "in"), (id(m), "out"), kind))

        def linear_hook(m, inputs, out):
            layers.append((out[0].numel() * m.in_features, (id(m), "in"), (id(m), "out"), "dense"))

        def attention_hook(m, inputs):
            tokens = inputs[0].shape[1]
            # q@k^T and attn@v: 2 * N^2 * (heads * head_dim) per sample; heads follow proj's input
            layers.append((2 * tokens * tokens * m.num_heads * m.head_dim,
                           (id(m.proj), "in"), None, "attention"))

        handles = []
        for m in model.modules():
            if isinstance(m, CONV):
                handles.append(m.register_forward_hook(conv_hook))
            elif isinstance(m, nn.Linear):
                handles.append(m.register_forward_hook(linear_hook))
            elif m in attention:
                handles.append(m.register_forward_pre_hook(attention_hook))
        was_training = model.training
        model.eval()
        try:
            model(x[:1])
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        return layers

    def _param_spec(self, model: nn.Module) -> list[tuple[int, list[tuple[int, str]]]]:
        """(numel, governing slot keys) per parameter tensor."""
        owners = {}
        for m in model.modules():
            for attr, p in m.named_parameters(recurse=False):
                owners[id(p)] = (m, attr)
        spec = []
        for _, p in model.named_parameters():
            m, attr = owners[id(p)]
            keys: list[tuple[int, str]] = []
            if (id(p), "out") in self.slots:  # an unwrapped parameter (layer scale, ...)
                keys = [(id(p), "out")]
            elif isinstance(m, CONV) and is_depthwise(m):
                keys = [(id(m), "out")]
            elif isinstance(m, (*CONV, nn.Linear)):
                keys = [(id(m), "out")] + ([(id(m), "in")] if attr == "weight" else [])
            elif isinstance(m, (*BATCHNORM, nn.LayerNorm, nn.GroupNorm)):
                keys = [(id(m), "out")]
            spec.append((p.numel(), keys))
        return spec

    def _compile(self) -> None:
        """Index tensors so that one evaluation is a handful of vector operations, in float64
        (MAC counts reach 1e10; float32 would round them)."""
        keys = list(self.slots)
        index = {k: i for i, k in enumerate(keys)}
        none = len(keys)  # a slot whose fraction is always 1
        self._offsets = [0]
        for g in self.graph.groups:
            self._offsets.append(self._offsets[-1] + g.size)
        flat, slot_of = [], []
        for i, key in enumerate(keys):
            for gi, roots in self.slots[key].segments:
                flat.append(roots + self._offsets[gi])
                slot_of.append(torch.full((len(roots),), i, dtype=torch.long))
        self._entry_flat = torch.cat(flat) if flat else torch.empty(0, dtype=torch.long)
        self._entry_slot = torch.cat(slot_of) if slot_of else torch.empty(0, dtype=torch.long)
        f64 = torch.float64
        self._fixed = torch.tensor([float(self.slots[k].fixed) for k in keys], dtype=f64)
        self._total = torch.tensor([float(self.slots[k].total) for k in keys], dtype=f64)
        self._layer_base = torch.tensor([float(m) for m, *_ in self.layers], dtype=f64)
        uses_in = [kind != "depthwise" for *_, kind in self.layers]
        uses_out = [kind != "attention" for *_, kind in self.layers]
        self._layer_in = torch.tensor([index.get(k_in, none) if u else none for (_, k_in, _, _), u
                                       in zip(self.layers, uses_in, strict=True)], dtype=torch.long)
        self._layer_out = torch.tensor([index.get(k_out, none) if u else none
                                        for (_, _, k_out, _), u
                                        in zip(self.layers, uses_out, strict=True)],
                                       dtype=torch.long)
        self._param_numel = torch.tensor([float(n) for n, _ in self.params_spec], dtype=f64)
        padded = [[index.get(k, none) for k in ks] + [none] * (2 - len(ks))
                  for _, ks in self.params_spec]
        self._param_slots = torch.tensor(padded, dtype=torch.long).view(-1, 2)

    # -- evaluation -----------------------------------------------------------------------

    def evaluate(self, keeps: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{"macs", "params", "channels"} with the given keep vectors (default: all kept)."""
        keeps = self.dense_keeps if keeps is None else keeps
        flat = torch.cat([k.reshape(-1) for k in keeps]).to(torch.float64).cpu()
        active = self._fixed.index_add(0, self._entry_slot, flat[self._entry_flat])
        fraction = torch.cat([active / self._total, torch.ones(1, dtype=torch.float64)])
        macs = self.unmodelled_macs + (self._layer_base * fraction[self._layer_in]
                                       * fraction[self._layer_out]).sum()
        params = (self._param_numel * fraction[self._param_slots[:, 0]]
                  * fraction[self._param_slots[:, 1]]).sum()
        return {"macs": macs, "params": params, "channels": flat.sum()}

    def evaluate_removals(self, removals: Sequence[torch.Tensor]) -> dict[str, float]:
        keep = torch.ones(self._offsets[-1], dtype=torch.float64)
        for g, r, offset in zip(self.graph.groups, removals, self._offsets, strict=False):
            if r.numel():
                keep[torch.tensor(g.channels_of(r)) + offset] = 0.0
        keeps = [keep[a:b] for a, b in zip(self._offsets, self._offsets[1:], strict=False)]
        return {k: float(v) for k, v in self.evaluate(keeps).items()}


def _width(target, direction: str, graph: StructuredGraph, item) -> int:
    """Channels of one dimension of a layer or unwrapped parameter."""
    if isinstance(target, nn.Parameter):
        return int(target.shape[item.dep.target.pruning_dim])
    if direction == "out":
        return int(graph.dg.get_out_channels(target))
    return int(graph.dg.get_in_channels(target))
