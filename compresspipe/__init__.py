"""compresspipe: declarative compression pipelines for timm models.

The Python API mirrors the command line::

    import compresspipe
    summary = compresspipe.run("pipelines/quickstart.yaml", overrides=["stages.0.train.epochs=2"])
    pipeline = compresspipe.Pipeline.from_yaml("pipelines/int8.yaml")   # validated, not run
    art = compresspipe.load("runs/quickstart/huffman")                 # or ".../model.cpz"

It is imported lazily so that ``compresspipe --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.4.0"
__all__ = ["run", "load", "load_pipeline", "Pipeline", "Artifact", "Stage", "register_stage",
           "list_stages", "__version__"]

if TYPE_CHECKING:
    from .api import load, run
    from .core.artifact import Artifact
    from .pipeline.loader import Pipeline, load_pipeline
    from .stages.base import Stage
    from .stages.registry import list_stages, register_stage

# name -> module that defines it, imported on first access
_LAZY = {"run": "api", "load": "api", "Artifact": "core.artifact", "Pipeline": "pipeline.loader",
         "load_pipeline": "pipeline.loader", "register_stage": "stages.registry",
         "list_stages": "stages.registry", "Stage": "stages.base"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'compresspipe' has no attribute {name!r}")
