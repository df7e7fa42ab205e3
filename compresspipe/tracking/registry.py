"""The MLflow Model Registry: a finished pipeline's chosen stage (``tracking.register``) becomes a
new version of a registered model, tagged with what it is (ratio, top-1, sparsity, bits per
weight, pipeline and fingerprint), and the configured alias moves to it, so that
``models:/NAME@ALIAS`` follows the latest registered compression."""

from __future__ import annotations

from typing import Any

from .config import RegisterConfig
from .tracker import Tracker, process_tracking_uri

# metric -> version tag: what a deployment choosing between versions looks at
VERSION_TAGS = {"compression_ratio": "ratio", "sparsity": "sparsity",
                "bits_per_weight": "bits_per_weight", "model_bytes": "model_bytes",
                "deployed_val_top1": "val_top1", "test_top1": "test_top1"}


# where the stage's model is the exported ONNX file, its own numbers (runs name them so)
ONNX_NUMBERS = {"model_bytes": "export_onnx_bytes", "test_top1": "export_onnx_top1",
                "compression_ratio": "export_onnx_compression_ratio",
                "bits_per_weight": "export_onnx_bits_per_weight"}


def version_tags(record: dict[str, Any], pipeline: str) -> dict[str, str]:
    """The tags of the model version registered from a stage's summary ``record``: the numbers
    of the registered model itself (``model_metrics``, those linked to it)."""
    metrics = dict(record.get("metrics", {}))
    model = record.get("model_metrics", {})
    metrics.update({key: model[onnx] for key, onnx in ONNX_NUMBERS.items() if onnx in model})
    tags = {tag: f"{metrics[key]:.6g}" for key, tag in VERSION_TAGS.items() if key in metrics}
    tags.update({"pipeline": pipeline, "stage": record["name"], "stage_type": record["type"],
                 "fingerprint": record.get("fingerprint", "")})
    return tags


def register_model(tracker: Tracker, cfg: RegisterConfig, model_id: str, run_id: str | None,
                   tags: dict[str, str]) -> dict[str, Any] | None:
    """Register logged model ``model_id`` as a new version of ``cfg.name`` and point
    ``cfg.alias`` at it; return {name, version, alias, uri} (None untracked)."""
    if not tracker.enabled:
        return None
    # lazy: importing mlflow takes seconds; untracked runs never pay for it
    from mlflow.exceptions import MlflowException

    client = tracker.client

    def ensure_registered() -> None:
        try:
            client.create_registered_model(cfg.name, description="compressed by compresspipe")
        except MlflowException as exc:  # another run registered it first
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    tracker.call(f"create registered model {cfg.name!r}", ensure_registered)
    def create_version():
        # source models:/<id> links the version to its logged model; a local store resolves
        # that id through the process's tracking URI, hence this pipeline's URI for the call
        with process_tracking_uri(tracker.uri):
            return client.create_model_version(cfg.name, source=f"models:/{model_id}",
                                               run_id=run_id, tags=tags, model_id=model_id)

    version = tracker.call(f"register a version of {cfg.name!r}", create_version)
    uri = f"models:/{cfg.name}/{version.version}"
    if cfg.alias:
        tracker.call(f"set alias {cfg.alias!r}", lambda: client.set_registered_model_alias(
            cfg.name, cfg.alias, version.version))
        uri = f"models:/{cfg.name}@{cfg.alias}"
    return {"name": cfg.name, "version": str(version.version), "alias": cfg.alias,
            "model_id": model_id, "uri": uri}
