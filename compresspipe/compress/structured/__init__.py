"""Structured pruning: channel groups from the dependency graph, importance, cost, allocation,
physical removal, and PaS."""
