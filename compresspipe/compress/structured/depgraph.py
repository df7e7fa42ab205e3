"""Torch-Pruning's DependencyGraph with two fixes structured pruning needs on timm families.

``BudgetedGraph.get_pruning_group`` is Torch-Pruning's own breadth-first search with a limit:
on some networks (RexNet's partial residual, ``cat([x[:, :n] + shortcut, x[:, n:]])``) the search
keeps finding the same channels under new index subsets and runs for minutes; here it stops
after ``max_items`` group items or when the graph's deadline passes (``GroupSearchTooLong``),
so that one tangled group is skipped instead of hanging the validation.

It also recomputes the channel offsets of every concatenation from the current layer widths
before each search. Torch-Pruning caches them at tracing time, so once one input of a
concatenation was narrowed, the next group through it was mapped to the wrong channels (GhostNet
and DenseNet emptied whole layers that way).
"""

from __future__ import annotations

import time

import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers, ops
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group

from ...core.errors import CompressPipeError


class GroupSearchTooLong(CompressPipeError):
    """Resolving one channel group took more items or time than allowed."""


class BudgetedGraph(tp.DependencyGraph):
    """A DependencyGraph whose group search is bounded and whose concat offsets are fresh."""

    def __init__(self, max_items: int = 0, deadline: float | None = None):
        super().__init__()
        self.max_items = max_items  # 0: 20 items per traced node
        self.deadline = deadline  # time.monotonic() value after which searches stop

    def _refresh_concat_offsets(self) -> None:
        for node in self.module2node.values():
            if node.type == ops.OPTYPE.CONCAT:
                node.module.concat_sizes = None  # recomputed from the current widths

    def get_pruning_group(self, module, pruning_fn, idxs) -> Group:
        """Torch-Pruning's search (graph.py, v1.6) with an item limit, a deadline and fresh
        concatenation offsets; the group it returns is the same."""
        if module not in self.module2node:
            raise ValueError(f"Module {module} is not in the dependency graph.")
        if (isinstance(module, ops.TORCH_CONV) and module.groups == module.out_channels
                and module.out_channels > 1):
            pruning_fn = tp.pruner.function.prune_depthwise_conv_out_channels
        idxs = [idxs] if isinstance(idxs, int) else idxs
        idxs = [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs]
        self._refresh_concat_offsets()
        index_mapping.update_index_mapping(self)
        group = Group()
        root_node = self.module2node[module]
        group.add_dep(dep=Dependency(pruning_fn, pruning_fn, source=root_node, target=root_node),
                      idxs=idxs)
        limit = self.max_items or 3 * len(self.module2node) + 50
        self.largest = max(getattr(self, "largest", 0), 0)
        visited = set()
        stack = [(group[0].dep, idxs)]
        while stack:
            dep, idxs_now = stack.pop(-1)
            node, fn = dep.target, dep.handler
            visited.add(node)
            for new_dep in node.dependencies:
                if not new_dep.is_triggered_by(fn):
                    continue
                new_idxs = idxs_now
                for mapping in new_dep.index_mapping:
                    if mapping is not None:
                        new_idxs = mapping(new_idxs)
                if len(new_idxs) == 0:
                    continue
                if new_dep.target in visited and group.has_pruning_op(new_dep, new_idxs):
                    continue
                group.add_dep(new_dep, new_idxs)
                stack.append((new_dep, new_idxs))
                if len(group.items) > limit or (self.deadline is not None
                                                and time.monotonic() > self.deadline):
                    raise GroupSearchTooLong(f"the channel group of {self._name(module)} "
                                             f"did not close within {limit} items or the "
                                             f"time budget")
        self.largest = max(self.largest, len(group.items))
        return self._merged(group)

    def _name(self, module) -> str:
        return self._module2name.get(module, type(module).__name__)

    def _merged(self, group: Group) -> Group:
        merged = Group()
        for dep, idxs in group.items:
            target = dep.target.module
            if isinstance(target, nn.Parameter) and any(target is p for p in self.ignored_params):
                continue
            merged.add_and_merge(dep, idxs)
        merged._DG = self
        for i in range(len(merged)):
            hybrid = merged[i].idxs
            item = _helpers.GroupItem(merged[i].dep, _helpers.to_plain_idxs(hybrid))
            item.root_idxs = _helpers.to_root_idxs(hybrid)
            merged[i] = item
        return merged

