"""One MLflow LoggedModel per stage: the stage's deployable, its measured metrics linked to it
(with the dataset they were measured on) and its lineage (the model it came from).

What the logged model holds: the deployable only (``tracking.pyfunc``: the files whose bytes are
the stage's ``model_bytes``, e.g. the .cpz, never the fp32 training weights, masks or
checkpoints beside it), so that a stage loads with ``mlflow.pyfunc.load_model`` and MLflow's
footprint is what the summary reports. Which stages' models hold files is the runner's choice
(``tracking.model_files``; by default the compressed ones and the registered one; a search's
trials none); the others hold none and point at their stage directory (an "external" model in
MLflow's terms).
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import DatasetRecord
from .pyfunc import save_mlflow_model
from .tracker import Tracker

# what a logged model lists: size, accuracy, sparsity, bits per weight, latency
LINKED = re.compile(r"^(top1|top5|loss|(deployed_val|val|test)_\w+|model_bytes|compression_ratio|sparsity|"
                    r"masked_sparsity|bits_per_weight|params|nonzero_params)$|latency")
TEST_KEYS = ("top1", "top5", "loss")
LINEAGE_TAG = "compresspipe.source_model_id"
EXTERNAL_TAG = "mlflow.model.isExternal"


@dataclass
class StageModel:
    """What the runner knows about a saved stage output."""

    stage: str
    stage_type: str
    pipeline: str
    directory: Path  # the stage's artifact directory
    deploy: dict[str, Any] | None
    spec: dict[str, Any]
    fingerprint: str
    parent_stage: str | None  # the stage whose output this one received
    source_model_id: str | None  # that stage's logged model
    example: np.ndarray  # a test batch: the MLflow model's input example
    num_classes: int
    extra_tags: dict[str, str] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        fmt = (self.deploy or {}).get("format") or "safetensors"
        tags = {"compresspipe.pipeline": self.pipeline, "compresspipe.stage": self.stage,
                "compresspipe.stage_type": self.stage_type, "compresspipe.fingerprint":
                self.fingerprint, "compresspipe.deploy_format": fmt,
                "compresspipe.stage_dir": str(self.directory.resolve()), **self.extra_tags}
        if self.parent_stage:
            tags["compresspipe.parent_stage"] = self.parent_stage
        if self.source_model_id:
            tags[LINEAGE_TAG] = self.source_model_id
        return tags

    def params(self) -> dict[str, str]:
        return {"stage": self.stage, "stage_type": self.stage_type,
                "parent_stage": self.parent_stage or "", "source_model_id":
                self.source_model_id or "", "deploy_files": ",".join(
                    (self.deploy or {}).get("files") or ["model.safetensors"])}


def log_stage_model(tracker: Tracker, run_id: str | None, model: StageModel,
                    with_files: bool) -> str | None:
    """Create the stage's LoggedModel (source run ``run_id``); return its id (None untracked)."""
    if not (tracker.enabled and run_id):
        return None
    # lazy: importing mlflow takes seconds; untracked runs never pay for it
    from mlflow.entities import LoggedModelOutput

    client = tracker.client
    tags = model.tags()
    if not with_files:
        tags[EXTERNAL_TAG] = "true"
    logged = tracker.call(f"create the logged model of stage {model.stage!r}",
                          lambda: client.create_logged_model(
                              tracker.experiment_id(), name=model.stage, source_run_id=run_id,
                              tags=tags, params=model.params(), model_type="compresspipe"))
    if with_files:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            save_mlflow_model(local, model.directory, model.deploy, model.spec, model.example,
                              model.num_classes)
            # one call per file: a retry after a failed request re-sends that file only
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                folder = path.parent.relative_to(local).as_posix()
                tracker.call(f"upload {path.name} of the model of stage {model.stage!r}",
                             lambda p=path, f=folder: client.log_model_artifact(
                                 logged.model_id, str(p), None if f == "." else f))
    tracker.call("link the model to its run", lambda: client.log_outputs(
        run_id, models=[LoggedModelOutput(logged.model_id, step=0)]))
    tracker.call("finalize the logged model",
                 lambda: client.finalize_logged_model(logged.model_id, "READY"))
    return logged.model_id


def split_metrics(metrics: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(the metrics a logged model lists, the rest: run metrics only)."""
    linked = {k: v for k, v in metrics.items() if LINKED.search(k)}
    return linked, {k: v for k, v in metrics.items() if k not in linked}


def log_model_metrics(tracker: Tracker, run_id: str | None, model_id: str | None,
                      metrics: dict[str, float], datasets: dict[str, DatasetRecord]) -> None:
    """Log ``metrics`` to the run, linked to the model; accuracy and loss also to the split they
    were measured on (top1/top5/loss and test_*: test; val_*: validation)."""
    groups: dict[str | None, dict[str, float]] = {}
    for key, value in metrics.items():
        split = ("test" if key in TEST_KEYS or key.startswith("test_")
                 else "validation" if key.startswith(("val_", "deployed_val_"))
                 else None)
        groups.setdefault(split if split in datasets else None, {})[key] = value
    for split, group in groups.items():
        record = datasets.get(split) if split else None
        tracker.log_metrics(run_id, group, model_id=model_id,
                            dataset=(record.name, record.digest) if record else None)


def exported_onnx_metrics(stage_metrics: dict[str, float], measured: dict[str, float],
                          reference_bytes: float) -> dict[str, float]:
    """The export stage's ONNX model's own numbers: its file's bytes and the top-1 the
    onnxruntime consumer measured, under the export stage's names. The runner's model_bytes and
    top1 of that stage are the .cpz it carries on; logged with the model's id they would also
    overwrite the run's."""
    onnx_bytes = stage_metrics.get("export_onnx_bytes")
    if not onnx_bytes:
        return {}
    out = {k: v for k, v in stage_metrics.items() if k.startswith("export_onnx_")}
    out["export_onnx_compression_ratio"] = reference_bytes / onnx_bytes
    out["export_onnx_bits_per_weight"] = 8.0 * onnx_bytes / (measured.get("params") or 1)
    for key in ("params", "nonzero_params", "sparsity"):
        if key in measured:
            out[key] = measured[key]
    return out
