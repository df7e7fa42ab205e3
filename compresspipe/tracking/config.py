"""The ``tracking:`` section of a pipeline file: where MLflow runs go and how calls are retried."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
)

from ..core.config import StrictModel


class TrackingConfig(StrictModel):
    """MLflow. The URI defaults to an sqlite database inside output_dir."""

    enabled: bool = True
    uri: str | None = Field(
        None,
        description="Tracking URI; default sqlite:///<output_dir>/mlflow.db. "
        "The MLFLOW_TRACKING_URI environment variable overrides both.",
    )
    experiment: str | None = Field(None, description="Experiment name; default: pipeline name.")
    run_name: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    log_artifacts: Literal["pointer", "full"] = Field(
        "pointer", description="'pointer': each stage run gets its deployable files (.cpz, "
        ".onnx, ...), its metadata and a pointer to the stored artifact; 'full': a full copy "
        "of the artifact directory with every tensor (large).")
    retries: int = Field(
        8, ge=0, le=1000,
        description="Retries of a call that failed transiently (server down or overloaded, "
        "timeout, HTTP 408/429/5xx, database locked), with exponential backoff and jitter.",
    )
    retry_timeout_s: float = Field(
        120.0, gt=0, le=86400,
        description="No retry starts later than this many seconds after a call's first try; "
        "then the run fails with a clear error and --resume continues it.",
    )
    retry_backoff_s: float = Field(0.5, gt=0, le=60,
                                   description="First backoff delay; doubles per retry (cap 10 s).")
    request_timeout_s: float = Field(120.0, gt=0, le=3600,
                                     description="Timeout of one HTTP request to the server "
                                     "(connecting, or waiting for its answer).")
