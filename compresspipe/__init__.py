"""compresspipe: declarative compression pipelines for timm models.

The public API is imported lazily so that ``compresspipe --help`` does not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["run", "load", "load_pipeline", "Artifact", "Stage", "register_stage", "__version__"]

if TYPE_CHECKING:
    from .artifact import Artifact
    from .config import load_pipeline
    from .registry import register_stage
    from .stages.base import Stage


def run(source: Any, overrides: list[str] | tuple[str, ...] = (), resume: bool = False) -> dict:
    """Validate and run a pipeline (a YAML path or a dict); return its summary."""
    from .config import load_pipeline
    from .runner import run_pipeline

    return run_pipeline(load_pipeline(source, overrides), resume=resume)


def load(path: Any) -> Artifact:
    """Load an artifact directory written by a stage."""
    from .artifact import Artifact

    return Artifact.load(path)


def __getattr__(name: str) -> Any:
    if name == "Artifact":
        from .artifact import Artifact

        return Artifact
    if name == "load_pipeline":
        from .config import load_pipeline

        return load_pipeline
    if name == "register_stage":
        from .registry import register_stage

        return register_stage
    if name == "Stage":
        from .stages.base import Stage

        return Stage
    raise AttributeError(f"module 'compresspipe' has no attribute {name!r}")
