"""The Python API's two verbs: ``run`` a pipeline and ``load`` a saved model.

``compresspipe.run`` and ``compresspipe.load`` resolve here on first use, so that importing the
package (and the CLI's ``--help``) does not pay for torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .core.artifact import META_FILE, Artifact
from .core.errors import ArtifactError
from .formats.cpz import MAGIC
from .formats.cpz_model import read_model_cpz
from .pipeline.loader import load_pipeline
from .pipeline.runner import run_pipeline


def run(source: Any, overrides: list[str] | tuple[str, ...] = (), resume: bool = False) -> dict:
    """Validate and run a pipeline (a YAML path or a dict); return its summary."""
    return run_pipeline(load_pipeline(source, overrides), resume=resume)


def load(path: str | os.PathLike) -> Artifact:
    """Load a saved model: an artifact directory written by a stage (model, spec, masks,
    quantization state, lineage), or a ``.cpz`` file, decoded into a runnable model with its
    spec and lineage (a .cpz holds no masks or training state). Nothing is unpickled."""
    p = Path(path)
    if p.is_dir():
        return Artifact.load(p)
    if p.is_file():
        with p.open("rb") as f:
            if f.read(len(MAGIC)) == MAGIC:
                return read_model_cpz(p)
        hint = (f" (load its directory {str(p.parent)!r})"
                if (p.parent / META_FILE).is_file() else "")
        raise ArtifactError(f"{path}: not an artifact directory or a .cpz file{hint}")
    raise ArtifactError(f"{path}: no such artifact directory or .cpz file")
