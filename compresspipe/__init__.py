"""compresspipe: declarative compression pipelines for timm models.

The Python API mirrors the command line::

    import compresspipe
    summary = compresspipe.run("pipelines/quickstart.yaml", overrides=["stages.0.train.epochs=2"])
    pipeline = compresspipe.Pipeline.from_yaml("pipelines/int8.yaml")   # validated, not run
    art = compresspipe.load("runs/quickstart/huffman")                 # or ".../model.cpz"

It is imported lazily so that ``compresspipe --help`` does not pay for torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["run", "load", "load_pipeline", "Pipeline", "Artifact", "Stage", "register_stage",
           "list_stages", "__version__"]

if TYPE_CHECKING:
    from .artifact import Artifact
    from .config import Pipeline, load_pipeline
    from .registry import list_stages, register_stage
    from .stages.base import Stage

# name -> module that defines it, imported on first access
_LAZY = {"Artifact": "artifact", "Pipeline": "config", "load_pipeline": "config",
         "register_stage": "registry", "list_stages": "registry", "Stage": "stages.base"}


def run(source: Any, overrides: list[str] | tuple[str, ...] = (), resume: bool = False) -> dict:
    """Validate and run a pipeline (a YAML path or a dict); return its summary."""
    from .config import load_pipeline
    from .runner import run_pipeline

    return run_pipeline(load_pipeline(source, overrides), resume=resume)


def load(path: str | os.PathLike) -> Artifact:
    """Load a saved model: an artifact directory written by a stage (model, spec, masks,
    quantization state, lineage), or a ``.cpz`` file, decoded into a runnable model with its
    spec and lineage (a .cpz holds no masks or training state). Nothing is unpickled."""
    from pathlib import Path

    from .artifact import META_FILE, Artifact
    from .errors import ArtifactError

    p = Path(path)
    if p.is_dir():
        return Artifact.load(p)
    if p.is_file():
        from .coding.cpz import MAGIC

        with p.open("rb") as f:
            if f.read(len(MAGIC)) == MAGIC:
                from .cpz_model import read_model_cpz

                return read_model_cpz(p)
        hint = (f" (load its directory {str(p.parent)!r})"
                if (p.parent / META_FILE).is_file() else "")
        raise ArtifactError(f"{path}: not an artifact directory or a .cpz file{hint}")
    raise ArtifactError(f"{path}: no such artifact directory or .cpz file")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'compresspipe' has no attribute {name!r}")
