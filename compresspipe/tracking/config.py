"""The ``tracking:`` section of a pipeline file: where MLflow runs go, how calls are retried,
what each stage's logged model holds and which stage is registered."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from ..core.config import StrictModel


class RegisterConfig(StrictModel):
    """Register a stage's deployable in the MLflow Model Registry when the pipeline finishes."""

    name: str = Field(..., min_length=1, max_length=256, pattern=r"^[^/:@]+$",
                      description="Registered model name; a new version per finished run.")
    alias: str | None = Field(
        None, max_length=255, pattern=r"^[\w\-]+$",
        description="Alias set to the new version, e.g. 'champion': models:/NAME@ALIAS.")
    stage: str | None = Field(None, description="The stage whose deployable is registered; "
                              "default: the last stage.")

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, alias: str | None) -> str | None:
        if alias is not None and re.fullmatch(r"latest|[vV]\d+", alias):
            raise ValueError(f"{alias!r} is reserved by MLflow (versions are 'v1', 'v2', ...; "
                             "'latest' is the newest version)")
        return alias


class TrackingConfig(StrictModel):
    """MLflow. The URI defaults to an sqlite database inside output_dir."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, serialize_by_alias=True)

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
    model_files: Literal["compressed", "all", "none"] = Field(
        "compressed", description="What each stage's MLflow logged model holds. 'compressed': "
        "its deployable files (loadable with mlflow.pyfunc) when they are smaller than the "
        "input model's, i.e. compressed; an fp32 intermediate (dense, pruned but stored "
        "dense) only points at its stage directory. 'all': every stage's files; 'none': "
        "pointers only. The registered stage always gets its files. true/false: all/none.")

    @field_validator("model_files", mode="before")
    @classmethod
    def _model_files_bool(cls, value: object) -> object:
        # files written before the three-way choice said true (every stage) or false (none)
        if isinstance(value, bool):
            return "all" if value else "none"
        return value

    # 'register' in the file; the attribute is named otherwise because pydantic's BaseModel
    # (an ABC) has a register() of its own
    registration: RegisterConfig | None = Field(
        None, alias="register",
        description="Register a stage's deployable as a model version with an alias.")
    request_timeout_s: float = Field(120.0, gt=0, le=3600,
                                     description="Timeout of one HTTP request to the server "
                                     "(connecting, or waiting for its answer).")
