"""Pruning methods by name, as timm registers models: ``@register_method("imp")`` on a function
of a ``Pruner``; ``get_method(name)`` and ``method_names()`` look them up.

This module only holds the table: ``compresspipe.compress.pruning.methods`` imports every
built-in method (which registers it) and re-exports the look-ups, so use them from there.
"""

from __future__ import annotations

from collections.abc import Callable

from .pruner import Pruner

# runs the whole method on the pruner (prune steps, training phases, round logs)
MethodFn = Callable[[Pruner], None]

_METHODS: dict[str, MethodFn] = {}


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    """Decorator: register a pruning method under ``name`` (each name once)."""

    def add(fn: MethodFn) -> MethodFn:
        if name in _METHODS:
            raise ValueError(f"pruning method {name!r} is already registered")
        _METHODS[name] = fn
        return fn

    return add


def get_method(name: str) -> MethodFn:
    """The method registered as ``name``; KeyError listing the known names."""
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"no pruning method {name!r}; known: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    """The registered methods' names, in registration order."""
    return list(_METHODS)
