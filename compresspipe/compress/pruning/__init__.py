"""Pruning pieces that combine: importance criteria, scopes, schedules, masks, structure."""
