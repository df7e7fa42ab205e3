"""Structured pruning: whole channels, filters and attention heads removed physically.

Four pieces that combine, each replaceable on its own:

* **graph** (``StructuredGraph``) — Torch-Pruning's DependencyGraph split into the channel
  groups that must shrink together (a residual stream, a block's hidden width, a layer's heads),
  with the reason why each other group stays as it is;
* **criteria** (``make_importance``, ``unit_scores``) — Torch-Pruning's importance estimators
  (L1/L2 filter norm, BN scale, FPGM, first-order Taylor) as one score per prunable unit;
* **cost** (``CostModel``) — parameters and MACs as an exact, differentiable function of the kept
  channels, so a budget is met without trial pruning (and PaS can put MACs in its loss);
* **algorithm** (``allocate``, ``remove_units``) — global or uniform removals that meet a
  channel, parameter or MACs target, then physical removal group by group through the graph.

A pruned model is described as JSON (``describe_structure``, stored as ``spec["structure"]``):
the narrowed width of every changed layer. ``apply_structure`` replays it on a freshly built base
model so that the saved safetensors load strictly; nothing is pickled.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...core.errors import CompressPipeError
from ...core.training import TrainHook

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

STRUCTURE_VERSION = 1
CRITERIA = ("l1", "l2", "bn_scale", "fpgm", "taylor")
TARGETS = ("channels", "params", "macs")
TOLERANCE = 0.02  # a budget counts as met within 2% of its target value

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# =============================================================================================
# Layer facts


def is_depthwise(module: nn.Module) -> bool:
    """A convolution whose every output channel reads only its own input channel."""
    return (isinstance(module, _CONV) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _is_grouped(module: nn.Module) -> bool:
    return isinstance(module, _CONV) and module.groups > 1 and not is_depthwise(module)


@dataclass
class AttentionInfo:
    """A timm-style multi-head attention: qkv -> heads -> proj, shapes from its attributes."""

    name: str
    module: nn.Module

    @property
    def heads(self) -> int:
        return int(self.module.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.module.head_dim)

    def set_heads(self, heads: int) -> None:
        """Keep the attributes the forward pass reshapes with in step with the pruned weights."""
        self.module.num_heads = heads
        if hasattr(self.module, "attn_dim"):
            self.module.attn_dim = heads * self.head_dim


def find_attention(model: nn.Module) -> tuple[dict[str, AttentionInfo], dict[str, str]]:
    """Attention layers whose heads can be removed, and {name: reason} for those that cannot.

    Supported: ``qkv`` and ``proj`` Linear layers with ``num_heads``/``head_dim`` attributes
    that match their shapes (timm's Attention). Anything else with ``num_heads`` reshapes by
    head count in code we cannot see, so its width must not change.
    """
    supported, unsupported = {}, {}
    for name, m in model.named_modules():
        if not hasattr(m, "num_heads") or not name:
            continue
        qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
        heads, head_dim = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
        norms = [getattr(m, k, None) for k in ("q_norm", "k_norm")]
        ok = (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
              and isinstance(heads, int) and isinstance(head_dim, int)
              and qkv.out_features == 3 * heads * head_dim
              and proj.in_features == heads * head_dim
              and all(n is None or isinstance(n, nn.Identity) for n in norms))
        if ok:
            supported[name] = AttentionInfo(name, m)
        else:
            unsupported[name] = type(m).__name__
    return supported, unsupported


# =============================================================================================
# Graph: the groups of coupled channels


@dataclass
class ChannelGroup:
    """Channels that must be removed together, indexed in the root layer's channel space."""

    name: str
    root: nn.Module
    root_fn: Callable  # Torch-Pruning pruning function applied to ``root``
    size: int  # channels in the root's index space
    items: list = field(repr=False, default_factory=list)  # the full Torch-Pruning group
    unit: int = 1  # channels per prunable unit: 1, or head_dim for attention heads
    kind: str = "channels"  # "channels" | "heads"
    members: list[tuple[str, str]] = field(default_factory=list)  # (layer, "in"|"out")
    attention: AttentionInfo | None = None

    @property
    def units(self) -> int:
        return self.size // self.unit

    def channels_of(self, units: torch.Tensor) -> list[int]:
        """Root channel indices of the given unit indices (heads expand to head_dim channels)."""
        units = units.flatten().long().cpu()
        if self.unit == 1:
            return sorted(units.tolist())
        offsets = torch.arange(self.unit)
        return sorted((units[:, None] * self.unit + offsets).flatten().tolist())


class StructuredGraph:
    """A model's dependency graph and the channel groups structured pruning may shrink.

    ``groups`` are prunable; ``skipped`` says, per group name, why the others keep their width
    (classifier output, ignored layers, token embeddings, grouped convolutions, ...).
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int],
                 ignore: Sequence[str] = (), need_gateable: bool = False):
        import torch_pruning as tp

        self.model = model
        self.input_shape = tuple(input_shape)
        self.ignore = list(ignore)
        self.names: dict[Any, str] = {m: n for n, m in model.named_modules()}
        self.names.update({p: n for n, p in model.named_parameters()})
        self.attention, unsupported = find_attention(model)
        if unsupported:
            name, kind = next(iter(unsupported.items()))
            more = f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
            raise CompressPipeError(
                f"layer {name!r} ({kind}){more} is an attention layer whose head layout "
                f"structured pruning cannot follow; supported are timm Attention layers "
                f"(qkv + proj, no q/k norm) as in ViT")
        was_training = model.training
        try:
            self.dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=self.example_input(), verbose=False)
        except Exception as exc:  # tracing runs arbitrary model code
            raise CompressPipeError(
                f"structured pruning cannot trace {type(model).__name__} with an input of shape "
                f"{list(self.input_shape)}: {type(exc).__name__}: {exc}") from exc
        finally:
            model.train(was_training)
        self.groups: list[ChannelGroup] = []
        self.skipped: dict[str, str] = {}
        self._collect_groups(need_gateable)

    def example_input(self) -> torch.Tensor:
        """A fixed random input (its own generator: the global random state is left alone)."""
        param = next(self.model.parameters())
        x = torch.randn(self.input_shape, generator=torch.Generator().manual_seed(0))
        return x.to(param.device, param.dtype)

    def is_out(self, fn: Callable) -> bool:
        return self.dg.is_out_channel_pruning_fn(fn)

    # -- grouping -------------------------------------------------------------------------

    def _collect_groups(self, need_gateable: bool) -> None:
        import torch_pruning as tp

        qkv_owner = {id(a.module.qkv): a for a in self.attention.values()}
        roots = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)
        for group in self.dg.get_all_groups(root_module_types=roots):
            attention = next((qkv_owner[id(it.dep.target.module)] for it in group
                              if id(it.dep.target.module) in qkv_owner
                              and self.is_out(it.dep.handler)), None)
            if attention is not None:
                candidate = self._head_group(attention)
            else:
                candidate = self._channel_group(group)
            reason = self._skip_reason(candidate, need_gateable)
            if reason:
                self.skipped[candidate.name] = reason
            else:
                self.groups.append(candidate)

    def _channel_group(self, group) -> ChannelGroup:
        root = group[0].dep.target.module
        members = self._members(group)
        outs = [n for n, d in members if d == "out" and n in self._module_order()]
        name = min(outs, key=self._module_order().get) if outs else self.names.get(root, "?")
        return ChannelGroup(name=name, root=root, root_fn=group[0].dep.handler,
                            size=len(group[0].idxs), items=list(group), members=members)

    def _head_group(self, attention: AttentionInfo) -> ChannelGroup:
        import torch_pruning as tp

        # rooted at proj's input (one index per head channel), as Torch-Pruning does for heads:
        # q, k and v rows follow through the reshape
        proj = attention.module.proj
        group = self.dg.get_pruning_group(proj, tp.prune_linear_in_channels,
                                          list(range(proj.in_features)))
        return ChannelGroup(name=f"{attention.name} (heads)", root=proj,
                            root_fn=tp.prune_linear_in_channels, size=proj.in_features,
                            items=list(group), unit=attention.head_dim, kind="heads",
                            members=self._members(group), attention=attention)

    def _module_order(self) -> dict[str, int]:
        if not hasattr(self, "_order"):
            self._order = {n: i for i, (n, _) in enumerate(self.model.named_modules())}
        return self._order

    def _members(self, group) -> list[tuple[str, str]]:
        out = []
        for it in group:
            target = it.dep.target.module
            if target in self.names:
                out.append((self.names[target], "out" if self.is_out(it.dep.handler) else "in"))
        return out

    def _skip_reason(self, g: ChannelGroup, need_gateable: bool) -> str | None:
        """Why this group must keep its width, or None when it may shrink."""
        import torch_pruning as tp

        if g.kind == "heads" and g.attention.heads < 2:
            return "a single attention head"
        classifier = _classifier(self.model)
        for it in g.items:
            target, node = it.dep.target.module, it.dep.target
            out = self.is_out(it.dep.handler)
            name = self.names.get(target, "?")
            if any(r is None for r in it.root_idxs):
                return f"channel mapping into {name} is not one-to-one"
            if node.type == tp.ops.OPTYPE.OUTPUT or (out and not node.outputs
                                                     and isinstance(target, nn.Module)):
                return f"{name} produces the model output"
            if out and target is classifier:
                return f"{name} is the classifier"
            if out and isinstance(target, nn.Module) and self.ignored(name):
                return f"{name} is ignored"
            if isinstance(target, nn.Parameter) and target.dim() >= 2:
                return f"token embedding {name} keeps the embedding width"
            if isinstance(target, nn.Parameter):
                continue
            if _is_grouped(target):
                return f"grouped convolution {name} (groups={target.groups})"
            if isinstance(target, _CONV) and target.transposed:
                return f"transposed convolution {name}"
            if isinstance(target, nn.GroupNorm):
                return f"GroupNorm {name} normalises channel groups"
            if isinstance(target, nn.LayerNorm) and len(target.normalized_shape) != 1:
                return f"LayerNorm {name} normalises several dimensions"
            if isinstance(target, nn.Module) and not isinstance(
                    target, (*_CONV, nn.Linear, *_BATCHNORM, nn.LayerNorm)) and name != "?":
                return f"{name} ({type(target).__name__}) cannot be narrowed"
            extra = _extra_state(target)
            if extra:
                return f"{name} ({type(target).__name__}) has its own tensor {extra!r}"
            if need_gateable and isinstance(target, nn.LayerNorm):
                return f"LayerNorm {name} mixes channels, so a gate is not a removal"
        if g.kind == "heads" and self.ignored(g.attention.name):
            return f"{g.attention.name} is ignored"
        return None

    def ignored(self, name: str) -> bool:
        """A layer is ignored when it or one of its parents matches an ignore pattern."""
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(p, pat) for p in prefixes for pat in self.ignore)


def _extra_state(module: nn.Module) -> str | None:
    """A parameter or buffer that Torch-Pruning's function for this layer type would not slice
    (e.g. the per-channel gain of a weight-standardised convolution)."""
    known = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    names = [n for n, _ in module.named_parameters(recurse=False)]
    names += [n for n, _ in module.named_buffers(recurse=False)]
    return next((n for n in names if n not in known), None)


def _classifier(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_classifier", None)
    try:
        return get() if callable(get) else None
    except Exception:  # a model's own get_classifier may not apply to its current head
        return None


# =============================================================================================
# Criteria


def make_importance(criterion: str):
    """A Torch-Pruning importance estimator for one of ``CRITERIA``.

    Every estimator sums over the coupled layers of a group and divides by the group's mean,
    so that scores of different groups compare in global ranking.
    """
    import torch_pruning as tp

    imp = tp.importance
    if criterion == "l1":
        return imp.GroupMagnitudeImportance(p=1)
    if criterion == "l2":
        return imp.GroupMagnitudeImportance(p=2)
    if criterion == "bn_scale":
        return imp.BNScaleImportance()
    if criterion == "fpgm":
        return imp.FPGMImportance()
    if criterion == "taylor":
        return imp.GroupTaylorImportance()
    raise CompressPipeError(f"unknown structured pruning criterion {criterion!r} "
                            f"(known: {', '.join(CRITERIA)})")


def accumulate_gradients(model: nn.Module, loader: DataLoader, device: torch.device,
                         batches: int) -> None:
    """Sum the cross-entropy gradients of ``batches`` training batches into ``.grad`` (what the
    first-order Taylor criterion multiplies with the weights). Eval mode: BN statistics stay."""
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        for i, (x, y) in enumerate(loader):
            if i >= batches:
                break
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
    finally:
        model.train(was_training)


def group_batchnorms(graph: StructuredGraph) -> list[nn.Module]:
    """BatchNorm layers inside prunable groups: the scales network slimming regularises."""
    seen: dict[int, nn.Module] = {}
    for g in graph.groups:
        for it in g.items:
            m = it.dep.target.module
            if isinstance(m, _BATCHNORM) and m.affine:
                seen[id(m)] = m
    return list(seen.values())


class BatchNormL1(TrainHook):
    """Network slimming's sparsity term, lambda * sum |gamma| (Liu et al. 2017), as a loss."""

    def __init__(self, layers: list[nn.Module], weight: float):
        self.layers, self.weight = layers, weight

    def extra_loss(self, model, inputs, outputs, targets) -> dict[str, torch.Tensor]:
        return {"bn_l1": self.weight * sum(m.weight.abs().sum() for m in self.layers)}


def unit_scores(graph: StructuredGraph, importance) -> list[torch.Tensor | None]:
    """Per group, one score per prunable unit (higher is kept); None when the criterion has
    nothing to read in that group (e.g. BN scale in a group without BatchNorm)."""
    scores: list[torch.Tensor | None] = []
    for g in graph.groups:
        full = graph.dg.get_pruning_group(g.root, g.root_fn, list(range(g.size)))
        try:
            imp = importance(full)
        except AttributeError as exc:  # Taylor without gradients
            raise CompressPipeError(f"criterion cannot score group {g.name}: {exc} (did every "
                                    "layer take part in the forward pass?)") from exc
        if imp is None:
            scores.append(None)
            continue
        imp = imp.detach().float().cpu()
        imp = torch.nan_to_num(imp, nan=0.0, posinf=0.0)
        scores.append(imp.view(g.units, g.unit).mean(1) if g.unit > 1 else imp)
    return scores


# =============================================================================================
# Cost: parameters and MACs as a function of the kept channels


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
        from ...core.measure import count_macs

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
            if isinstance(m, _CONV):
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
            elif isinstance(m, _CONV) and is_depthwise(m):
                keys = [(id(m), "out")]
            elif isinstance(m, (*_CONV, nn.Linear)):
                keys = [(id(m), "out")] + ([(id(m), "in")] if attr == "weight" else [])
            elif isinstance(m, (*_BATCHNORM, nn.LayerNorm, nn.GroupNorm)):
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


# =============================================================================================
# Algorithm: allocate removals to meet a target, then remove


@dataclass
class Allocation:
    removals: list[torch.Tensor]  # per group: unit indices to remove
    predicted: dict[str, float]  # cost after removal
    target_value: float


def allocate(graph: StructuredGraph, cost: CostModel, scores: Sequence[torch.Tensor | None],
             target: str, target_value: float, scope: str = "global",
             max_ratio: float = 0.9, round_to: int = 1) -> Allocation:
    """Remove the lowest-scoring units until ``target`` ("channels", "params" or "macs") is at
    most ``target_value``, removing as little as possible beyond it.

    ``global`` ranks all units of all groups together; ``uniform`` removes the same fraction of
    every group. No group loses more than ``max_ratio`` of its units or all of them; groups
    without scores keep their width; ``round_to`` keeps channel counts at multiples of it.
    """
    if target not in TARGETS:
        raise CompressPipeError(f"unknown target {target!r} (known: {', '.join(TARGETS)})")
    groups = graph.groups
    order = [torch.argsort(s, stable=True) if s is not None else None for s in scores]
    caps = [_cap(g, max_ratio, round_to) if s is not None else 0
            for g, s in zip(groups, scores, strict=True)]

    def removals_for(counts: Sequence[int]) -> list[torch.Tensor]:
        return [o[:_rounded(g, c, round_to)] if o is not None else torch.empty(0, dtype=torch.long)
                for g, o, c in zip(groups, order, counts, strict=True)]

    def value(counts: Sequence[int]) -> float:
        return cost.evaluate_removals(removals_for(counts))[target]

    if value(caps) > target_value * (1 + TOLERANCE):
        best = cost.evaluate_removals(removals_for(caps))[target]
        raise CompressPipeError(
            f"cannot reduce {target} to {target_value:,.0f}: removing the most allowed "
            f"(max_layer_ratio={max_ratio}) still leaves {best:,.0f}; raise max_layer_ratio, "
            f"ignore fewer layers or lower the ratio")
    if scope == "global":
        counts = _global_counts(scores, caps, value, target_value)
    elif scope == "uniform":
        counts = _uniform_counts(groups, caps, value, target_value)
    else:
        raise CompressPipeError(f"unknown scope {scope!r} (global | uniform)")
    removals = removals_for(counts)
    return Allocation(removals, cost.evaluate_removals(removals), target_value)


def _cap(g: ChannelGroup, max_ratio: float, round_to: int) -> int:
    """The most units this group may lose: at least one unit (round_to channels) stays."""
    keep_min = max(1, math.ceil(g.units * (1 - max_ratio)))
    if g.kind == "channels" and round_to > 1:
        keep_min = max(keep_min, min(round_to, g.units))
    return max(g.units - keep_min, 0)


def _rounded(g: ChannelGroup, count: int, round_to: int) -> int:
    """Units to remove so the kept channel count is a multiple of round_to (rounded up)."""
    if g.kind != "channels" or round_to <= 1 or count == 0:
        return count
    kept = min(g.units, math.ceil((g.units - count) / round_to) * round_to)
    return g.units - kept


def _global_counts(scores, caps, value, target_value) -> list[int]:
    """Take units in ascending score order (each group capped) until the target is met.

    Bisection finds the longest prefix that is not yet enough; after it, a unit whose removal
    would undershoot the target by more than the tolerance (a whole head, an expensive stem
    channel) is passed over for the next cheaper one, so the result lands within tolerance.
    """
    entries = sorted((float(s[i]), gi, int(i))
                     for gi, s in enumerate(scores) if s is not None
                     for i in torch.argsort(s, stable=True)[: caps[gi]])

    def counts_at(k: int) -> list[int]:
        counts = [0] * len(scores)
        for _, gi, _ in entries[:k]:
            counts[gi] += 1
        return counts

    lo, hi = 0, len(entries)
    while lo < hi:  # smallest k whose prefix meets the target
        mid = (lo + hi) // 2
        if value(counts_at(mid)) <= target_value:
            hi = mid
        else:
            lo = mid + 1
    if lo == 0:
        return counts_at(0)
    counts = counts_at(lo - 1)
    floor = target_value * (1 - TOLERANCE)
    blocked: set[int] = set()  # groups whose next unit is too big a step
    for _, gi, _ in entries[lo - 1:]:
        if gi in blocked or counts[gi] >= caps[gi]:
            continue
        trial = counts.copy()
        trial[gi] += 1
        v = value(trial)
        if v < floor:
            blocked.add(gi)
            continue
        counts = trial
        if v <= target_value:
            return counts
    return counts_at(lo)


def _uniform_counts(groups, caps, value, target_value) -> list[int]:
    """The same fraction t of every group (bisection on t), then single units from the groups
    furthest below t until the target is met, so no group strays more than one unit; a unit
    that would undershoot the target by more than the tolerance is passed over."""

    def counts_at(t: float) -> list[int]:
        return [min(cap, int(t * g.units)) for g, cap in zip(groups, caps, strict=True)]

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if value(counts_at(mid)) <= target_value:
            hi = mid
        else:
            lo = mid
    counts = counts_at(lo)
    floor = target_value * (1 - TOLERANCE)
    while value(counts) > target_value:
        open_ = sorted((i for i, (c, cap) in enumerate(zip(counts, caps, strict=True)) if c < cap),
                       key=lambda j: (counts[j] + 1) / groups[j].units)
        if not open_:
            break
        trials = [[c + (i == j) for i, c in enumerate(counts)] for j in open_]
        counts = next((t for t in trials if value(t) >= floor), trials[0])
    return counts


def remove_units(graph: StructuredGraph, removals: Sequence[torch.Tensor],
                 masks: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Physically remove the given units group by group; return the masks sliced alike.

    Unstructured masks ride along as the gradients of their parameters, which Torch-Pruning
    slices together with the weights, so every kept weight keeps its own mask bit. A forward
    pass afterwards checks that the network still runs with the same output shape; a failure
    names the pruned groups instead of leaving a wrong model.
    """
    model = graph.model
    masks = masks or {}
    params = dict(model.named_parameters())
    missing = [n for n in masks if n not in params]
    if missing:
        raise CompressPipeError(f"masks name parameters the model does not have: {missing[:3]}")
    model.zero_grad(set_to_none=True)
    for name, mask in masks.items():
        params[name].grad = mask.to(params[name].device, params[name].dtype).clone()
    x = graph.example_input()
    expected = _forward_shape(model, x)
    pruned = []
    for g, units in zip(graph.groups, removals, strict=True):
        if units.numel() == 0:
            continue
        group = graph.dg.get_pruning_group(g.root, g.root_fn, g.channels_of(units))
        group.prune()
        if g.attention is not None:
            g.attention.set_heads(g.attention.heads - units.numel())
        pruned.append(g.name)
    names = ", ".join(pruned[:8]) + (f" and {len(pruned) - 8} more" if len(pruned) > 8 else "")
    try:
        shape = _forward_shape(model, x)
    except Exception as exc:
        raise CompressPipeError(f"removing channels of groups {names} breaks the forward pass "
                                f"of {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
    if shape != expected:
        raise CompressPipeError(f"removing channels of groups {names} changed the output shape "
                                f"from {expected} to {shape}")
    params = dict(model.named_parameters())
    sliced = {name: params[name].grad.detach().bool().cpu() for name in masks}
    model.zero_grad(set_to_none=True)
    return sliced


@torch.no_grad()
def _forward_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    was_training = model.training
    model.eval()
    try:
        return tuple(model(x).shape)
    finally:
        model.train(was_training)


# =============================================================================================
# Structure description: what changed relative to the base architecture, replayable


def _widths(module: nn.Module) -> dict[str, int] | None:
    """In/out widths of a layer kind that structured pruning narrows."""
    if isinstance(module, _CONV):
        return {"in": module.in_channels, "out": module.out_channels, "groups": module.groups}
    if isinstance(module, nn.Linear):
        return {"in": module.in_features, "out": module.out_features}
    if isinstance(module, _BATCHNORM):
        return {"out": module.num_features}
    if isinstance(module, nn.LayerNorm):
        return {"out": int(module.normalized_shape[-1])}
    if isinstance(module, nn.GroupNorm):
        return {"out": module.num_channels}
    return None


def describe_structure(model: nn.Module, base: nn.Module) -> dict[str, Any]:
    """JSON description of how ``model`` is narrower than ``base`` (same architecture built
    from the spec): widths of changed layers, shapes of changed loose parameters, head counts."""
    base_modules = dict(base.named_modules())
    layers: dict[str, dict[str, int]] = {}
    attention: dict[str, dict[str, int]] = {}
    wrapped: set[str] = set()
    for name, m in model.named_modules():
        now = _widths(m)
        if now is not None:
            wrapped.update(f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False))
            then = _widths(base_modules[name]) if name in base_modules else None
            if then is None or type(base_modules[name]) is not type(m):
                raise CompressPipeError(f"layer {name!r} is not in the base architecture")
            if now != then:
                layers[name] = {k: v for k, v in now.items() if k != "groups"}
        if (hasattr(m, "num_heads") and name in base_modules
                and getattr(base_modules[name], "num_heads", None) != m.num_heads):
            attention[name] = {"num_heads": int(m.num_heads)}
    base_params = dict(base.named_parameters())
    parameters = {n: list(p.shape) for n, p in model.named_parameters()
                  if n not in wrapped and n in base_params and p.shape != base_params[n].shape}
    return {"version": STRUCTURE_VERSION, "layers": layers, "parameters": parameters,
            "attention": attention}


def apply_structure(model: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Narrow a freshly built base model in place to the described widths (values are not
    kept: the weights are loaded afterwards). Raises CompressPipeError naming the layer when
    the description does not fit the model."""
    import torch_pruning as tp

    version = structure.get("version")
    if version != STRUCTURE_VERSION:
        raise CompressPipeError(f"structure: version {version!r}, this compresspipe reads "
                                f"{STRUCTURE_VERSION}")
    modules = dict(model.named_modules())
    supported, _ = find_attention(model)  # before narrowing: it checks qkv against num_heads
    registry = tp.DependencyGraph()  # only its registry of per-layer pruning functions
    for name, want in structure.get("layers", {}).items():
        m = modules.get(name)
        if m is None or _widths(m) is None:
            raise CompressPipeError(f"structure: layer {name!r} is not a prunable layer of "
                                    f"{type(model).__name__}")
        pruner = registry.get_pruner_of_module(m)
        for direction in ("out", "in"):
            if direction not in want:
                continue
            have = _widths(m)[direction]
            if want[direction] > have or want[direction] < 1:
                raise CompressPipeError(f"structure: layer {name!r} has {have} {direction}put "
                                        f"channels, cannot narrow to {want[direction]}")
            if want[direction] < have:
                fn = pruner.prune_out_channels if direction == "out" else pruner.prune_in_channels
                fn(m, list(range(want[direction], have)))
        got = {k: v for k, v in _widths(m).items() if k in want}
        if got != want:
            raise CompressPipeError(f"structure: layer {name!r} became {got}, expected {want}")
    params = dict(model.named_parameters())
    for name, shape in structure.get("parameters", {}).items():
        if name not in params:
            raise CompressPipeError(f"structure: parameter {name!r} is not in the model")
        p = params[name]
        if len(shape) != p.dim() or any(s > h for s, h in zip(shape, p.shape, strict=True)):
            raise CompressPipeError(f"structure: parameter {name!r} of shape {list(p.shape)} "
                                    f"cannot become {shape}")
        parent_name, _, leaf = name.rpartition(".")
        narrowed = p.detach()[tuple(slice(0, s) for s in shape)].clone()
        setattr(modules[parent_name], leaf, nn.Parameter(narrowed, requires_grad=p.requires_grad))
    for name, attrs in structure.get("attention", {}).items():
        m = modules.get(name)
        if m is None or not hasattr(m, "num_heads"):
            raise CompressPipeError(f"structure: {name!r} is not an attention layer")
        if name in supported:
            supported[name].set_heads(int(attrs["num_heads"]))
        else:
            m.num_heads = int(attrs["num_heads"])
    return model


def base_model(spec: dict[str, Any]) -> nn.Module:
    """The unpruned architecture of a spec (random weights): the reference for descriptions."""
    from ...core.models import build_from_spec

    return build_from_spec({k: v for k, v in spec.items() if k != "structure"})


# =============================================================================================
# Reporting


def layer_widths(model: nn.Module, base: nn.Module) -> list[dict[str, Any]]:
    """Output width of every conv/linear layer (and head count of every attention layer),
    kept against the base architecture, in model order."""
    base_modules = dict(base.named_modules())
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, (*_CONV, nn.Linear)) and name in base_modules:
            rows.append({"layer": name, "kept": _widths(m)["out"],
                         "total": _widths(base_modules[name])["out"]})
        elif hasattr(m, "num_heads") and name in base_modules and name:
            rows.append({"layer": f"{name} (heads)", "kept": int(m.num_heads),
                         "total": int(base_modules[name].num_heads)})
    return rows


# =============================================================================================
# Stage support: what both structured stages do around their algorithm


def input_shape_of(data_cfg) -> tuple[int, int, int, int]:
    """(1, channels, size, size): the shape MACs are counted for and graphs are traced with."""
    return (1, data_cfg.dataset_channels(), data_cfg.image_size, data_cfg.image_size)


def check_graph(model: nn.Module, data_cfg, ignore: Sequence[str], what: str = "pruned",
                **graph_kwargs) -> tuple[StructuredGraph | None, list[tuple[str, str]]]:
    """The dependency graph a structured stage would work on, or the validation problems
    (``ignore`` patterns that match nothing, a layer the graph cannot handle, no group left)."""
    from ...stages.patterns import unmatched_pattern_problems

    problems = unmatched_pattern_problems(model, ignore, "ignore", kind="module")
    if problems:
        return None, problems
    try:
        graph = StructuredGraph(model, input_shape_of(data_cfg), ignore, **graph_kwargs)
    except CompressPipeError as exc:  # names the layer the model cannot be pruned at
        return None, [("ignore", str(exc))]
    if not graph.groups:
        return None, [("ignore", _no_groups(graph, what))]
    return graph, []


def _no_groups(graph: StructuredGraph, what: str) -> str:
    return (f"no channel group of the model can be {what}: "
            + "; ".join(f"{k}: {v}" for k, v in graph.skipped.items()))


def stage_start(artifact, ctx, stage: str, ignore: Sequence[str], what: str = "pruned",
                **graph_kwargs) -> tuple[nn.Module, tuple[int, ...], nn.Module, StructuredGraph]:
    """Where both structured stages start: the model on the device, the traced input shape, a
    dense copy (the MACs and latency reference) and the dependency graph."""
    import copy

    require_unquantized(artifact, stage)
    model = artifact.model.to(ctx.device)
    shape = input_shape_of(ctx.pipeline.config.data)
    dense = copy.deepcopy(model).eval()
    graph = StructuredGraph(model, shape, ignore, **graph_kwargs)
    if not graph.groups:
        raise CompressPipeError(f"stage {stage!r}: {_no_groups(graph, what)}")
    return model, shape, dense, graph


def require_unquantized(artifact, stage: str) -> None:
    """Structured pruning narrows float layers; a quantized artifact must be pruned earlier."""
    if artifact.quant:
        raise CompressPipeError(f"stage {stage!r}: the incoming model is quantized; run "
                                "structured pruning before quantization")


def record_result(artifact, ctx, dense: nn.Module, shape: Sequence[int], latency,
                  info: dict[str, Any]) -> dict[str, float]:
    """Store the structure in the spec, log params/MACs/latency, write the widths plot.

    ``dense`` is the incoming model (for the before/after numbers and the latency ratio,
    measured in the same process, interleaved); ``latency`` a LatencyConfig or None.
    """
    from ...core.measure import compare_latency, count_macs

    model = artifact.model
    base = base_model(artifact.spec).to(next(model.parameters()).device)
    artifact.spec = {**artifact.spec, "structure": describe_structure(model, base)}
    before, after = count_macs(dense, shape), count_macs(model, shape)
    metrics = {"macs": after["macs"], "macs_before": before["macs"],
               "macs_reduction": before["macs"] / max(after["macs"], 1),
               "params_before": before["params"], "params_after": after["params"]}
    if latency is not None:
        for batch in latency.batch_sizes:
            times = compare_latency({"dense": dense, "pruned": model}, shape, batch=batch,
                                    repeats=latency.repeats, rounds=latency.rounds,
                                    threads=latency.threads)
            metrics[f"latency_b{batch}_ms"] = 1000 * times["pruned"]
            metrics[f"latency_b{batch}_before_ms"] = 1000 * times["dense"]
            metrics[f"speedup_b{batch}"] = times["dense"] / times["pruned"]
    ctx.log_metrics(metrics, None)
    rows = layer_widths(model, base)
    record = {**info, **metrics, "layer_widths": rows,
              "latency_threads": latency.threads if latency is not None else None}
    artifact.meta.setdefault("structured", {})[ctx.spec.name] = record
    title = (f"{ctx.spec.name}: {before['macs'] / 1e6:.2f}M -> {after['macs'] / 1e6:.2f}M MACs, "
             f"{before['params']:,} -> {after['params']:,} params")
    from ...tracking.plots import widths_plot

    artifact.outputs["layer_widths.png"] = lambda path: widths_plot(rows, path, title)
    return metrics
