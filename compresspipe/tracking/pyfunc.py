"""compresspipe's MLflow pyfunc flavour: a stage's deployable files as an MLflow model that
``mlflow.pyfunc.load_model`` loads and ``mlflow models serve`` serves.

The model directory holds the deployable only (the files the stage's ``model_bytes`` measure:
``model.cpz``, the codebook file, or ``model.safetensors`` for a plain stage) and
``compresspipe_model.json`` (the network's spec and the deploy entry). Loading rebuilds the model
exactly as the runner measured it (``Artifact.deployed_model``: a .cpz is decoded, codebooks are
expanded), so the served predictions are those of the reported accuracy. An int8 ONNX
deployable is saved with MLflow's own onnx flavour instead.

Nothing is pickled: the flavour is a ``loader_module`` (this module, imported by name by MLflow;
compresspipe must be installed where the model is served), not a cloudpickled PythonModel.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from ..compress.quant.onnx_int8 import OnnxModel
from ..core.artifact import MODEL_FILE, Artifact
from ..core.errors import ArtifactError
from ..core.models import build_from_saved_spec

INFO_FILE = "compresspipe_model.json"
MLMODEL_FILE = "MLmodel"
DATA_DIR = "deployable"
ONNX_DEPLOY = "onnx-int8"
FLAVOUR_MODULE = __name__
PREDICT_BATCH = 256


def save_mlflow_model(path: Path, directory: Path, deploy: dict[str, Any] | None, spec: dict,
                      example: np.ndarray, num_classes: int) -> str:
    """Write the MLflow model of the deployable in the artifact ``directory`` to ``path``;
    return its flavour ('compresspipe' or 'onnx')."""
    # lazy: importing mlflow takes seconds; untracked runs never pay for it
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, *example.shape[1:]), "images")]),
        outputs=Schema([TensorSpec(np.dtype("float32"), (-1, num_classes), "logits")]))
    files = list(deploy["files"]) if deploy else [MODEL_FILE]
    if deploy and deploy.get("format") == ONNX_DEPLOY:
        import mlflow.onnx  # lazy: with mlflow
        import onnx  # lazy: onnx loads only where an ONNX model is written

        mlflow.onnx.save_model(onnx.load(str(directory / files[0])), str(path),
                               signature=signature, input_example=example,
                               save_as_external_data=False, pip_requirements=_requirements(),
                               onnx_execution_providers=["CPUExecutionProvider"])
        return "onnx"
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / DATA_DIR
        data.mkdir()
        for name in files:
            if name == MODEL_FILE and not (directory / name).is_file():
                # saved into the tensor store, the stage keeps no safetensors file: write the
                # one that ships
                save_model(Artifact.load(directory).model, str(data / name),
                           metadata={"format": "compresspipe"})
            else:
                _link_or_copy(directory / name, data / name)
        info = {"format_version": 1, "spec": spec, "deploy": deploy, "files": files}
        (data / INFO_FILE).write_text(json.dumps(info, indent=2))
        mlflow.pyfunc.save_model(str(path), loader_module=FLAVOUR_MODULE, data_path=str(data),
                                 signature=signature, input_example=example,
                                 pip_requirements=_requirements())
    return "compresspipe"


def load_deployed(data: Path) -> nn.Module:
    """The deployed network of a saved flavour directory (``<model>/data/deployable``), in eval
    mode; an ``ArtifactError`` naming the file when it is not one."""
    info_path = data / INFO_FILE
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{info_path}: not a compresspipe MLflow model ({exc})") from None
    deploy = info.get("deploy") if isinstance(info, dict) else None
    if not isinstance(info, dict) or (deploy is not None and not (
            isinstance(deploy, dict) and isinstance(deploy.get("files"), list)
            and all(isinstance(f, str) and f and Path(f).name == f and f not in (".", "..")
                    for f in deploy["files"]))):
        raise ArtifactError(f"{info_path}: invalid compresspipe model description")
    if deploy is None:
        model = build_from_saved_spec(info.get("spec"), str(info_path))
        try:
            load_model(model, str(data / MODEL_FILE))
        except (OSError, RuntimeError, ValueError) as exc:
            raise ArtifactError(f"{data / MODEL_FILE}: {exc}") from None
        return model.eval()
    # the deploy loaders read the spec and the deployable files only, never the fp32 weights
    # (which this directory does not hold): the artifact is a shell around them
    shell = Artifact(model=nn.Identity(), spec=info.get("spec") or {}, deploy=deploy)
    return shell.deployed_model(data)


def load_mlflow_model(path: Path) -> nn.Module:
    """The network of a downloaded MLflow model directory that compresspipe logged: its
    deployable (this flavour), or the ONNX file of the onnx flavour (run by onnxruntime, e.g. as
    a frozen teacher). Read from the MLmodel file, with no code of the model's choosing run."""
    import yaml  # lazy: only to read an MLmodel file

    try:
        flavors = yaml.safe_load((path / MLMODEL_FILE).read_text()).get("flavors", {})
        pyfunc = flavors.get("python_function", {})
        if pyfunc.get("loader_module") == FLAVOUR_MODULE:
            return load_deployed(path / str(pyfunc["data"]))
        if "onnx" in flavors:
            return OnnxModel(path / str(flavors["onnx"]["data"])).eval()
    except (OSError, AttributeError, KeyError, TypeError, yaml.YAMLError) as exc:
        raise ArtifactError(f"{path / MLMODEL_FILE}: unreadable MLflow model ({exc})") from None
    raise ArtifactError(f"{path}: an MLflow model of flavours {sorted(flavors)}, not one that "
                        "compresspipe logged (its own flavour or onnx)")


class DeployedModel:
    """What ``mlflow.pyfunc`` wraps: numpy images (N, C, H, W) in, float32 logits out."""

    def __init__(self, model: nn.Module):
        self.model = model

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        if isinstance(model_input, dict) and len(model_input) == 1:  # {"images": array}
            model_input = next(iter(model_input.values()))
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        outs = []
        with torch.inference_mode():
            for i in range(0, len(x), PREDICT_BATCH):
                outs.append(self.model(x[i: i + PREDICT_BATCH]).float().cpu().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def _load_pyfunc(data_path: str) -> DeployedModel:
    """MLflow's entry point for a ``loader_module`` flavour."""
    return DeployedModel(load_deployed(Path(data_path)))


def _requirements() -> list[str]:
    # lazy: only to name the versions this model was written with
    import mlflow
    import safetensors

    try:  # the installed distribution, as pip and MLflow's environment check see it
        version = importlib.metadata.version("compresspipe")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        version = sys.modules[__name__.split(".")[0]].__version__
    return [f"compresspipe=={version}", f"torch=={torch.__version__.split('+')[0]}",
            f"safetensors=={safetensors.__version__}", f"mlflow=={mlflow.__version__}",
            f"numpy=={np.__version__}"]


def _link_or_copy(src: Path, dest: Path) -> None:
    """A hard link where possible: MLflow copies the model directory itself when logging."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)
