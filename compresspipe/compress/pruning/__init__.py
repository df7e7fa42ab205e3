"""Unstructured and N:M pruning as pieces that combine: importance ``criteria``, ``scopes``
(which weights take part, globally or per layer, N:M blocks), ``schedules`` (IMP rounds, GMP's
cubic curve, retraining LR rules), the ``Pruner`` state the methods share (``pruner``), the
methods registered by name (``methods/``, ``registry``) and their config (``config``)."""
