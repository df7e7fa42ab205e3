"""Stage registry: `@register_stage("name")` on a class, `get_stage("name")` to find it.

Third-party stages are named by dotted path, ``"my_pkg.stages:MyStage"``; the module is imported
only when a pipeline names it. Also the registry of invariants the runner checks after every
stage (``@register_invariant``). This module imports no torch: the CLI reaches it cheaply, and
the built-in stage modules are imported on first use.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from ..core.errors import CompressPipeError, suggest

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from ..core.artifact import Artifact
    from .base import Stage
    from .spec import StageSpec

    # (stage, its incoming masks, the artifact it returned) -> None; raises when broken
    Invariant = Callable[[Stage, dict[str, torch.Tensor], Artifact], None]

_STAGES: dict[str, type[Stage]] = {}
_INVARIANTS: list[Invariant] = []
_BUILTINS_LOADED = False


def register_stage(name: str):
    """Class decorator: make a Stage subclass available under ``name`` in pipeline files."""

    def wrap(cls: type[Stage]) -> type[Stage]:
        if name in _STAGES and _STAGES[name] is not cls:
            raise CompressPipeError(f"stage type {name!r} is registered twice")
        cls.type_name = name
        _STAGES[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        package = importlib.import_module(__package__)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{__package__}.{module.name}")


def is_dotted_path(name: str) -> bool:
    return ":" in name


def list_stages() -> dict[str, type[Stage]]:
    """All registered stage types, built-ins first loaded."""
    _load_builtins()
    return dict(sorted(_STAGES.items()))


def get_stage(name: str) -> type[Stage]:
    """The stage class for a type name or a ``package.module:Class`` path."""
    from .base import Stage  # lazy: it imports torch, which this module keeps away from the CLI

    _load_builtins()
    if name in _STAGES:
        return _STAGES[name]
    if is_dotted_path(name):
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise CompressPipeError(f"cannot import stage module {module_name!r}: {exc}") from exc
        cls = getattr(module, attr, None)
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise CompressPipeError(f"{name!r} is not a compresspipe Stage subclass")
        if not getattr(cls, "type_name", None):
            cls.type_name = name
        _STAGES[name] = cls
        return cls
    raise CompressPipeError(
        f"unknown stage type {name!r}{suggest(name, list(_STAGES))} "
        f"(known: {', '.join(sorted(_STAGES))})"
    )


def register_invariant(fn: Invariant) -> Invariant:
    """Decorator: a check (or repair) the runner applies after every stage, whatever its type."""
    _INVARIANTS.append(fn)
    return fn


def invariants() -> list[Invariant]:
    """The registered invariants, built-ins first loaded, in registration order."""
    _load_builtins()
    return list(_INVARIANTS)


def stage_class(spec: StageSpec) -> type[Stage] | None:
    """The class of a stage entry, or None where its type is unknown (a file with errors)."""
    try:
        return get_stage(spec.type) if spec.type else None
    except CompressPipeError:
        return None
