"""A starting checkpoint named by an MLflow URI: ``model.checkpoint: models:/NAME@ALIAS`` (or
``models:/NAME/VERSION``, ``models:/<model id>``, ``runs:/<id>/<path>``).

The model is fetched once per process from the pipeline's tracking store, rebuilt as the stage
that logged it deployed it (a .cpz is decoded, a plain stage read from its safetensors), and its
weights written to ``<output_dir>/.checkpoints/<digest>.safetensors``: the model builder then
loads that file like any local checkpoint, so the checks and the run see the same tensors. The
file is named by the URI and the store, and the pipeline's configuration keeps the URI.
"""

from __future__ import annotations

import hashlib

from safetensors.torch import save_model

from ..core.artifact import Artifact
from ..core.config import ModelConfig
from ..core.errors import CompressPipeError
from ..tracking.download import download_teacher
from ..tracking.pyfunc import MLMODEL_FILE, load_mlflow_model
from ..tracking.tracker import tracking_uri
from .references import is_mlflow_uri
from .schema import PipelineConfig

CHECKPOINT_DIR = ".checkpoints"


def local_model_config(config: PipelineConfig) -> ModelConfig:
    """``config.model`` with an MLflow checkpoint replaced by the local file of its weights;
    the section itself when the checkpoint is a file (or absent)."""
    model = config.model
    if not is_mlflow_uri(model.checkpoint):
        return model
    uri, out = str(model.checkpoint), config.resolved_output_dir()
    digest = hashlib.sha256(f"{uri}\n{tracking_uri(config.tracking, out)}".encode()).hexdigest()
    target = out / CHECKPOINT_DIR / f"{digest[:16]}.safetensors"
    if not target.is_file():
        try:
            path = download_teacher(uri, config.tracking, out, what="model.checkpoint")
            network = (load_mlflow_model(path) if (path / MLMODEL_FILE).is_file()
                       else Artifact.load(path).deployed_model(path))
        except CompressPipeError as exc:
            raise CompressPipeError(f"model.checkpoint: {exc}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        save_model(network, str(partial), metadata={"source": uri})
        partial.replace(target)  # a killed run leaves no half-written checkpoint behind
    return model.model_copy(update={"checkpoint": target})
