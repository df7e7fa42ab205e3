"""Torch-Pruning's DependencyGraph with two fixes structured pruning needs on timm families.

A time limit on each group search: on some networks (RexNet's partial residual,
``cat([x[:, :n] + shortcut, x[:, n:]])``) Torch-Pruning's search keeps finding the same channels
under new index subsets and runs for minutes. ``BudgetedGraph`` runs the library's own
``get_pruning_group`` under a per-group timer (a POSIX interval timer, so the search itself is
unchanged) and raises ``GroupSearchTooLong`` when it fires or the graph's deadline has passed,
so that one tangled group is skipped instead of hanging the validation. Both count this
process's CPU time, not wall time: on a loaded machine (the support matrix ran at load 17 on 2
cores) wall-clock limits skipped ordinary groups and refused MaxViT, so which channels a file
prunes depended on what else the machine was doing.

Fresh concatenation offsets before each search: Torch-Pruning caches them at tracing time, so
once one input of a concatenation was narrowed, the next group through it was mapped to the
wrong channels (GhostNet and DenseNet emptied whole layers that way).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch_pruning as tp
from torch_pruning import ops
from torch_pruning.dependency.group import Group

from ...core.errors import CompressPipeError

GROUP_LIMIT_S = 2.0  # CPU seconds of one group's search; ordinary groups close in milliseconds
cpu_clock = time.process_time  # the clock of every graph budget (see the module docstring)


class GroupSearchTooLong(CompressPipeError):
    """Resolving one channel group took more time than allowed."""


@contextmanager
def _time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise GroupSearchTooLong in the middle of the block after ``seconds`` of this process's
    CPU time (ITIMER_PROF). Only the main thread receives signals; elsewhere the block runs
    unbounded and the graph's deadline is checked between groups."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _expired(signum, frame):
        raise GroupSearchTooLong(f"the channel group of {what} did not close within "
                                 f"{seconds:.1f} CPU s")

    previous = signal.signal(signal.SIGPROF, _expired)
    # repeating: Torch-Pruning catches broad exceptions in places, so one interruption can be
    # swallowed; the next one, 50 ms later, lands elsewhere
    signal.setitimer(signal.ITIMER_PROF, max(seconds, 1e-3), 0.05)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


class BudgetedGraph(tp.DependencyGraph):
    """A DependencyGraph whose group searches are time-bounded and whose concat offsets are
    fresh."""

    def __init__(self, group_limit_s: float = GROUP_LIMIT_S, deadline: float | None = None):
        super().__init__()
        self.group_limit_s = group_limit_s
        self.deadline = deadline  # cpu_clock() value after which searches stop

    def _refresh_concat_offsets(self) -> None:
        for node in self.module2node.values():
            if node.type == ops.OPTYPE.CONCAT:
                node.module.concat_sizes = None  # recomputed from the current widths

    def get_pruning_group(self, module, pruning_fn, idxs) -> Group:
        """Torch-Pruning's own search, bounded in time, on fresh concatenation offsets."""
        self._refresh_concat_offsets()
        if self.deadline is None:
            return super().get_pruning_group(module, pruning_fn, idxs)
        left = self.deadline - cpu_clock()
        what = self._module2name.get(module, type(module).__name__)
        if left <= 0:
            raise GroupSearchTooLong(f"the time budget ran out before the group of {what}")
        with _time_limit(min(self.group_limit_s, left), what):
            return super().get_pruning_group(module, pruning_fn, idxs)
