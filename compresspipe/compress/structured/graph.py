"""The channel groups structured pruning may shrink, from Torch-Pruning's DependencyGraph.

``StructuredGraph`` traces a model once and splits its dependency graph into ``ChannelGroup``s:
channels that must shrink together (a residual stream, a block's hidden width, a layer's heads),
each indexed in its root layer's channel space, and says for every other group why it keeps its
width (classifier output, ignored layers, token embeddings, grouped convolutions, ...). Also the
layer facts the groups are judged by (``is_depthwise``, grouped convolutions, extra tensors).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...core.errors import CompressPipeError
from ...core.structure import BATCHNORM, CONV, AttentionInfo, find_attention

DEFAULT_BUDGET_S = 20.0  # CPU s; building the groups of any listed timm family at 32 px takes < 5 s


def is_depthwise(module: nn.Module) -> bool:
    """A convolution whose every output channel reads only its own input channel."""
    return (isinstance(module, CONV) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def _is_grouped(module: nn.Module) -> bool:
    return isinstance(module, CONV) and module.groups > 1 and not is_depthwise(module)


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
                 ignore: Sequence[str] = (), need_gateable: bool = False,
                 budget_s: float = DEFAULT_BUDGET_S, verify: bool = True):
        from .depgraph import BudgetedGraph, cpu_clock  # lazy: imports Torch-Pruning (seconds)

        self.model = model
        self.input_shape = tuple(input_shape)
        self.ignore = list(ignore)
        self.budget_s = budget_s
        self.names: dict[Any, str] = {m: n for n, m in model.named_modules()}
        self.names.update({p: n for n, p in model.named_parameters()})
        self.attention, self.unsupported_attention = find_attention(model)
        deadline = cpu_clock() + budget_s
        was_training = model.training
        try:
            self.dg = BudgetedGraph(deadline=deadline).build_dependency(
                model, example_inputs=self.example_input(), verbose=False)
        except Exception as exc:  # tracing runs arbitrary model code
            raise CompressPipeError(
                f"structured pruning cannot trace {type(model).__name__} with an input of shape "
                f"{list(self.input_shape)}: {type(exc).__name__}: {exc}") from exc
        finally:
            model.train(was_training)
        self.groups: list[ChannelGroup] = []
        self.skipped: dict[str, str] = {}
        self._collect_groups(need_gateable, deadline)
        self.dg.deadline = None  # the budget is for building; removals later run unbounded
        if verify and self.groups:
            self._drop_breaking_groups()

    def example_input(self) -> torch.Tensor:
        """A fixed random input (its own generator: the global random state is left alone)."""
        param = next(self.model.parameters())
        x = torch.randn(self.input_shape, generator=torch.Generator().manual_seed(0))
        return x.to(param.device, param.dtype)

    def is_out(self, fn: Callable) -> bool:
        return self.dg.is_out_channel_pruning_fn(fn)

    # -- grouping -------------------------------------------------------------------------

    def _collect_groups(self, need_gateable: bool, deadline: float) -> None:
        qkv_owner = {id(a.module.qkv): a for a in self.attention.values()}
        for group in self._all_groups(deadline):
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

    def _all_groups(self, deadline: float):
        """Torch-Pruning's get_all_groups (output channels of every conv and linear layer as a
        root), except that a group whose search does not close is skipped with its reason, and
        the whole takes at most the graph's time budget."""
        import torch_pruning as tp  # lazy: seconds to import; only structured stages run it

        from .depgraph import GroupSearchTooLong, cpu_clock  # lazy: imports Torch-Pruning

        visited: set[int] = set()
        for m in list(self.dg.module2node):
            if (not isinstance(m, (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)) or id(m) in visited
                    or m in self.dg.IGNORED_LAYERS_IN_TRACING):
                continue
            pruner = self.dg.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            try:
                group = self.dg.get_pruning_group(m, pruner.prune_out_channels,
                                                  list(range(pruner.get_out_channels(m))))
            except GroupSearchTooLong as exc:
                if cpu_clock() > deadline:
                    raise self._too_long() from exc
                visited.add(id(m))
                self.skipped[self.names.get(m, "?")] = (
                    f"its channel dependencies do not resolve ({exc}); it keeps its width")
                continue
            visited.update(id(it.dep.target.module) for it in group if self.is_out(it.dep.handler))
            yield group

    def _too_long(self) -> CompressPipeError:
        done = len(self.groups) + len(self.skipped)
        return CompressPipeError(
            f"building the channel groups of {type(self.model).__name__} took more than "
            f"{self.budget_s:g} CPU s (graph_budget_s) after {done} groups; the graph is too "
            f"costly to resolve at input {list(self.input_shape)}: add `ignore:` patterns for the "
            f"blocks that tangle it, or use unstructured pruning (stage 'prune')")

    def _drop_breaking_groups(self) -> None:
        """Dry-run a removal in every group on a copy of the network; a group whose removal
        breaks the forward pass (code that reshapes by a width it reads from an attribute)
        keeps its width, with the error as its reason."""
        from .probe import breaking_groups  # lazy: imports Torch-Pruning (seconds)

        bad = breaking_groups(self)
        for i in sorted(bad, reverse=True):
            g = self.groups.pop(i)
            self.skipped[g.name] = f"removing its channels breaks the forward pass ({bad[i]})"

    def _channel_group(self, group) -> ChannelGroup:
        root = group[0].dep.target.module
        members = self._members(group)
        outs = [n for n, d in members if d == "out" and n in self._module_order()]
        name = min(outs, key=self._module_order().get) if outs else self.names.get(root, "?")
        return ChannelGroup(name=name, root=root, root_fn=group[0].dep.handler,
                            size=len(group[0].idxs), items=list(group), members=members)

    def _head_group(self, attention: AttentionInfo) -> ChannelGroup:
        import torch_pruning as tp  # lazy: seconds to import; only structured stages run it

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
        import torch_pruning as tp  # lazy: seconds to import; only structured stages run it

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
            inside = self._unsupported_attention_of(name)
            if out and inside:
                return (f"{name} is inside {inside}, whose head layout structured pruning "
                        f"cannot follow; the attention keeps its width")
            cut = _fixed_cut(it.dep, node, tp)
            if cut:
                return (f"model code {cut} these channels at sizes fixed when it was built "
                        f"({getattr(node, 'name', name)}); narrowing them would break that code")
            if isinstance(target, nn.Parameter) and target.dim() >= 2:
                return f"token embedding {name} keeps the embedding width"
            if isinstance(target, nn.Parameter):
                continue
            if _is_grouped(target):
                return f"grouped convolution {name} (groups={target.groups})"
            if isinstance(target, CONV) and target.transposed:
                return f"transposed convolution {name}"
            if isinstance(target, nn.GroupNorm):
                return f"GroupNorm {name} normalises channel groups"
            if isinstance(target, nn.LayerNorm) and len(target.normalized_shape) != 1:
                return f"LayerNorm {name} normalises several dimensions"
            if isinstance(target, nn.Module) and not isinstance(
                    target, (*CONV, nn.Linear, *BATCHNORM, nn.LayerNorm)) and name != "?":
                return f"{name} ({type(target).__name__}) cannot be narrowed"
            extra = _extra_state(target)
            if extra:
                return f"{name} ({type(target).__name__}) has its own tensor {extra!r}"
            if need_gateable and isinstance(target, nn.LayerNorm):
                return f"LayerNorm {name} mixes channels, so a gate is not a removal"
        if g.kind == "heads" and self.ignored(g.attention.name):
            return f"{g.attention.name} is ignored"
        return None

    def _unsupported_attention_of(self, name: str) -> str | None:
        for attn, kind in self.unsupported_attention.items():
            if name.startswith(attn + "."):
                return f"{attn} ({kind})"
        return None

    def ignored(self, name: str) -> bool:
        """A layer is ignored when it or one of its parents matches an ignore pattern."""
        parts = name.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(p, pat) for p in prefixes for pat in self.ignore)


def _fixed_cut(dep, node, tp) -> str | None:
    """'slices' or 'splits' where the group's channels pass a slice or split along the channel
    dimension (Torch-Pruning maps its indices only then): the sizes are constants of the model's
    code (GhostNet's ``out[:, :out_chs]``, RexNet's partial residual, MobileViTv2's
    ``split([1, d, d])``), so a narrower input no longer fits them."""
    if node.type not in (tp.ops.OPTYPE.SLICE, tp.ops.OPTYPE.SPLIT):
        return None
    mapped = any(m is not None and type(m).__name__ in ("_SliceIndexMapping", "_SplitIndexMapping")
                 for m in dep.index_mapping)
    if not mapped:
        return None
    return "slices" if node.type == tp.ops.OPTYPE.SLICE else "splits"


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
