"""Structured pruning: whole channels, filters and attention heads removed physically.

Pieces that combine, each replaceable on its own:

* ``graph`` — ``StructuredGraph``: Torch-Pruning's DependencyGraph split into the channel groups
  that must shrink together (``ChannelGroup``), with the reason why each other group keeps its
  width; the layer facts they are judged by;
* ``importance`` — Torch-Pruning's importance estimators (L1/L2 filter norm, BN scale, FPGM,
  first-order Taylor) as one score per prunable unit, and network slimming's BN-scale penalty;
* ``cost`` — ``CostModel``: parameters and MACs as an exact, differentiable function of the kept
  channels, so a budget is met without trial pruning (and PaS can put MACs in its loss);
* ``allocate`` — global or uniform removals that meet a channel, parameter or MACs target, then
  physical removal group by group through the graph;
* ``pas`` — Pruning-as-Search: every group's width learnt with binary gates under a MACs budget.

The narrowed network is described as JSON and replayed on a freshly built base model by
``core.structure`` (part of building a model from its spec); what the stages do around these
pieces is in ``stages.structured_support``.
"""
