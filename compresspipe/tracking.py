"""MLflow tracking: one parent run per pipeline, one nested run per stage, metrics in batches.

Uses MlflowClient with explicit run ids rather than mlflow's global "active run", so nothing
depends on hidden state and a resumed pipeline can reopen its runs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .config import TrackingConfig

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call


def tracking_uri(cfg: TrackingConfig, output_dir: Path) -> str:
    """Environment beats file beats the default sqlite database inside output_dir."""
    return (os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
            or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b': 'value'} params, values as MLflow shows them."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return out


class Tracker:
    """Logs one pipeline run. With tracking disabled every method is a no-op."""

    def __init__(self, cfg: TrackingConfig, output_dir: Path, pipeline_name: str):
        self.enabled = cfg.enabled
        self.cfg, self.output_dir, self.pipeline_name = cfg, output_dir, pipeline_name
        self.uri = tracking_uri(cfg, output_dir) if cfg.enabled else None
        self.parent_id: str | None = None
        self._client = None
        self._experiment_id: str | None = None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _experiment(self) -> str:
        if self._experiment_id is None:
            name = self.cfg.experiment or self.pipeline_name
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                self._experiment_id = exp.experiment_id
            else:
                location = None
                if self.uri and self.uri.startswith("sqlite:"):
                    # keep artifacts beside the database, not in ./mlruns of the caller's cwd
                    location = (self.output_dir / "mlartifacts").resolve().as_uri()
                self._experiment_id = self.client.create_experiment(name, artifact_location=location)
        return self._experiment_id

    # -- runs ---------------------------------------------------------------------------------

    def start_pipeline(self, params: dict[str, Any], resume_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        if resume_id is not None:
            self.client.update_run(resume_id, status="RUNNING")
            self.parent_id = resume_id
            return resume_id
        tags = {"compresspipe.pipeline": self.pipeline_name, **self.cfg.tags}
        run = self.client.create_run(self._experiment(), run_name=self.cfg.run_name
                                     or self.pipeline_name, tags=tags)
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def start_stage(self, name: str, type_name: str, params: dict[str, Any],
                    resume_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        if resume_id is not None:
            self.client.update_run(resume_id, status="RUNNING")
            return resume_id
        run = self.client.create_run(
            self._experiment(), run_name=name,
            tags={"mlflow.parentRunId": self.parent_id, "compresspipe.stage": name,
                  "compresspipe.stage_type": type_name, **self.cfg.tags},
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id:
            self.client.set_terminated(run_id, status=status)

    def mark_stale(self, run_id: str | None, status: str = "KILLED") -> None:
        """A run a killed process left RUNNING: close it so no run stays RUNNING forever."""
        if not (self.enabled and run_id):
            return
        try:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, status=status)
        except Exception:  # the run may be gone (deleted by the user); nothing to close
            pass

    # -- logging ------------------------------------------------------------------------------

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        if not (self.enabled and run_id):
            return
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i: i + 100])

    def log_metrics(self, run_id: str | None, metrics: dict[str, float],
                    step: int | None = None) -> None:
        """All metrics in as few calls as MLflow allows (one per 1000)."""
        if not (self.enabled and run_id and metrics):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(run_id, metrics=items[i: i + MAX_BATCH])

    def log_artifact(self, run_id: str | None, path: Path, subdir: str | None = None) -> None:
        if self.enabled and run_id:
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), subdir)
            else:
                self.client.log_artifact(run_id, str(path), subdir)

    def log_text(self, run_id: str | None, text: str, name: str) -> None:
        if self.enabled and run_id:
            self.client.log_text(run_id, text, name)

    def set_tag(self, run_id: str | None, key: str, value: str) -> None:
        if self.enabled and run_id:
            self.client.set_tag(run_id, key, value)
