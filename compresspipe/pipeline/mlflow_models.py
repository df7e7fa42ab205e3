"""What a pipeline run shows an MLflow user beyond runs and metrics: the data each run saw
(datasets as run inputs), one LoggedModel per stage with its metrics and lineage, and the
registered version of ``tracking.register``. The runner calls these at one place each; the MLflow
calls themselves are in ``tracking/`` (datasets, models, registry).

Every stage run gets the test split as an input (the runner evaluates every stage on it) and the
training (and validation) split when the stage builds a training loop. The pipeline's run gets
every split.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.artifact import META_FILE
from ..core.data import DataBundle
from ..core.errors import CompressPipeError
from ..formats.export import example_inputs
from ..stages.spec import StageSpec
from ..tracking.datasets import DatasetRecord, describe_data
from ..tracking.models import (
    StageModel,
    exported_onnx_metrics,
    log_model_metrics,
    log_stage_model,
    split_metrics,
)
from ..tracking.registry import register_model, version_tags
from ..tracking.tracker import Tracker
from .schema import PipelineConfig

# measured by the runner on the stage's model; the export stage's ONNX model lists these too
SHARED_WITH_ONNX = ("params", "nonzero_params", "sparsity")


@dataclass
class StageLog:
    """What one stage logged itself: its final metrics, whether it trained, its own model."""

    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    trained: bool = False
    model_id: str | None = None


class ModelTracking:
    """Datasets, logged models and registration of one pipeline run (no-ops untracked)."""

    def __init__(self, tracker: Tracker, cfg: PipelineConfig, stage_names: list[str],
                 out: Path):
        self.tracker, self.cfg, self.out = tracker, cfg, out
        self.final = stage_names[-1]
        self.datasets: dict[str, DatasetRecord] = {}

    def log_datasets(self, parent: str | None, data: DataBundle) -> None:
        """Every split of the data as an input of the pipeline's run."""
        if self.tracker.enabled and parent:
            self.datasets = describe_data(data)
            self.tracker.log_datasets(parent, list(self.datasets.values()))

    # -- the callbacks a stage's context gets -------------------------------------------------

    def stage_metrics(self, log: StageLog) -> Callable[[dict[str, float], int | None], None]:
        def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
            self.tracker.log_metrics(log.run_id, metrics, step)
            if step is None:  # a stage's final numbers (latency among them) go to its model
                log.metrics.update(metrics)
        return log_metrics

    def on_train(self, log: StageLog) -> Callable[[], None]:
        def trained() -> None:
            if not log.trained:
                log.trained = True
                self.tracker.log_datasets(log.run_id, [d for s, d in self.datasets.items()
                                                       if s != "test"])
        return trained

    def onnx_model(self, spec: StageSpec, log: StageLog,
                   previous: Callable[[], dict[str, Any]]) -> Callable[[Path, Any], str | None]:
        """The export stage's ``log_model``: its ONNX file is its logged model (onnx flavour)."""
        def log_model(path: Path, example: Any) -> str | None:
            before = previous()
            tags = {"compresspipe.pipeline": self.cfg.name, "compresspipe.stage": spec.name,
                    "compresspipe.stage_type": spec.type, "compresspipe.deploy_format": "onnx"}
            if before.get("name"):
                tags["compresspipe.parent_stage"] = before["name"]
            if before.get("model_id"):
                tags["compresspipe.source_model_id"] = before["model_id"]
            uri = self.tracker.log_onnx_model(log.run_id, path, example, name=spec.name,
                                              tags=tags)
            log.model_id = uri.removeprefix("models:/") if uri else None
            return uri
        return log_model

    # -- after a stage was saved and measured -------------------------------------------------

    def log_stage(self, record: dict[str, Any], stages: list[dict[str, Any]],
                  data: DataBundle, log: StageLog) -> None:
        """The stage's measured metrics (those of its model linked to its LoggedModel, created
        here unless the stage logged its own), the test split as an input, and the model's id
        into ``record``. ``stages``: the summary's records, ``record`` the last."""
        linked, rest = split_metrics(record["metrics"])
        if log.model_id is not None:  # the export stage's ONNX file: its own numbers
            rest = {k: v for k, v in record["metrics"].items() if k not in SHARED_WITH_ONNX}
            linked = {k: v for k, v in record["metrics"].items() if k in SHARED_WITH_ONNX}
            linked.update(exported_onnx_metrics(log.metrics, record["metrics"],
                                                stages[0]["metrics"]["model_bytes"]))
        self.tracker.log_metrics(log.run_id, rest)
        if not (self.tracker.enabled and log.run_id):
            return
        if "test" in self.datasets:
            self.tracker.log_datasets(log.run_id, [self.datasets["test"]])
        if log.model_id is None:
            record["model_holds_files"] = self.holds_files(record, stages)
            log.model_id = self._create_model(record, stages, data, log.run_id)
        latency = {k: v for k, v in log.metrics.items() if "latency" in k}
        log_model_metrics(self.tracker, log.run_id, log.model_id, {**linked, **latency},
                          self.datasets)
        record["model_id"] = log.model_id
        record["model_metrics"] = {**linked, **latency}

    def _create_model(self, record: dict[str, Any], stages: list[dict[str, Any]],
                      data: DataBundle, run_id: str) -> str | None:
        directory = self.out / record["name"]
        # as saved: the in-memory artifact's deploy entry is cleared once written
        saved = json.loads((directory / META_FILE).read_text())
        parent = stages[-2] if len(stages) > 1 else None  # the input has no logged model
        return log_stage_model(self.tracker, run_id, StageModel(
            stage=record["name"], stage_type=record["type"], pipeline=self.cfg.name,
            directory=directory, deploy=saved.get("deploy") or None,
            spec=saved["spec"], fingerprint=record["fingerprint"],
            parent_stage=parent["name"] if parent else None,
            source_model_id=parent.get("model_id") if parent else None,
            example=example_inputs(data.test).numpy(), num_classes=data.num_classes),
            with_files=record["model_holds_files"])

    def holds_files(self, record: dict[str, Any], stages: list[dict[str, Any]]) -> bool:
        """Whether the stage's logged model holds its deployable files (``tracking.model_files``;
        the registered stage always does): by default when they are smaller than the input
        model's, so that a 45 MB fp32 intermediate is a pointer and a .cpz is a file."""
        mode = self.cfg.tracking.model_files
        register = self.cfg.tracking.registration
        if mode == "all" or (register is not None
                             and record["name"] == (register.stage or self.final)):
            return True
        if mode == "none" or not stages:
            return False
        return record["metrics"]["model_bytes"] < stages[0]["metrics"]["model_bytes"]

    # -- when the pipeline finished -----------------------------------------------------------

    def register(self, stages: list[dict[str, Any]]) -> dict[str, Any] | None:
        """``tracking.register``: the named (default: last) stage's logged model becomes a new
        version of the registered model, tagged, with the alias; None when not configured."""
        cfg = self.cfg.tracking.registration
        if cfg is None or not self.tracker.enabled:
            return None
        name = cfg.stage or self.final
        record = next(r for r in stages if r["name"] == name)
        if not record.get("model_id"):
            raise CompressPipeError(f"tracking.register: stage {name!r} has no MLflow model "
                                    "(its run was logged by a compresspipe without logged models, "
                                    "or with tracking disabled): run the pipeline again")
        registered = register_model(self.tracker, cfg, record["model_id"], record.get("run_id"),
                                    version_tags(record, self.cfg.name))
        print(f"   registered stage {name!r} as {registered['uri']} "
              f"(version {registered['version']})", flush=True)
        return registered
