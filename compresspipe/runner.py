"""The pipeline loop: run stages in order, save and measure each artifact, track, resume.

Layout of ``output_dir``::

    input/, <stage>/...   one artifact per completed stage (atomic directories)
    summary.json          every completed stage with its metrics (rewritten after each stage)
    .work/<stage>/        epoch checkpoints of the stage in progress
    mlflow.db, mlartifacts/   the default MLflow store
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import signal
import time
from typing import Any

import torch

from .artifact import MODEL_FILE, Artifact, write_json
from .config import Pipeline, StageSpec
from .context import StageContext
from .errors import CompressPipeError
from .measure import check_masks, evaluate, file_bytes, mask_stats, param_counts
from .registry import get_stage
from .tracking import Tracker

SUMMARY_FILE = "summary.json"
INPUT_STAGE = "input"
SUMMARY_METRICS = ("top1", "top5", "loss", "model_bytes", "compression_ratio", "sparsity")


class Interrupted(KeyboardInterrupt):
    """SIGTERM turned into an exception so runs are closed as KILLED."""


def run_pipeline(pipeline: Pipeline, resume: bool = False) -> dict[str, Any]:
    """Run every stage; return the summary (also written to output_dir/summary.json)."""
    return Runner(pipeline).run(resume=resume)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressPipeError(f"device: {name!r} requested but CUDA is not available")
    return device


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Runner:
    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline
        self.cfg = pipeline.config
        self.out = pipeline.output_dir
        self.tracker = Tracker(self.cfg.tracking, self.out, self.cfg.name)
        self.summary: dict[str, Any] = {}

    # -- fingerprints: a completed stage is reused on --resume only if nothing before it changed

    def _fingerprints(self) -> list[str]:
        c = self.cfg
        fp = _digest(c.seed, c.model.model_dump(mode="json"), c.data.model_dump(mode="json"))
        out = [fp]
        for s in self.pipeline.stages:
            fp = _digest(fp, s.name, s.type, s.config.model_dump(mode="json"))
            out.append(fp)
        return out

    def run(self, resume: bool = False) -> dict[str, Any]:
        from .data import build_data

        torch.manual_seed(self.cfg.seed)
        device = resolve_device(self.cfg.device)
        fingerprints = self._fingerprints()
        previous = self._read_summary() if resume else None
        if not resume:
            self._clear_outputs()
        self.out.mkdir(parents=True, exist_ok=True)
        done = self._completed(previous, fingerprints)
        start = max(len(done) - 1, 0)

        self.summary = {
            "pipeline": self.cfg.name, "status": "running", "output_dir": str(self.out),
            "tracking_uri": self.tracker.uri, "parent_run_id": None, "stages": done,
            "stage_runs": dict((previous or {}).get("stage_runs", {})),
        }
        old_handler = signal.signal(signal.SIGTERM, _raise_interrupted)
        parent = None
        stage_run = None
        try:
            parent = self.tracker.start_pipeline(
                {"seed": self.cfg.seed, "model": self.cfg.model.model_dump(mode="json"),
                 "data": self.cfg.data.model_dump(mode="json"),
                 "stages": [s.name for s in self.pipeline.stages]},
                resume_id=(previous or {}).get("parent_run_id"),
            )
            self.summary["parent_run_id"] = parent
            self.tracker.log_text(parent, self.pipeline.resolved_yaml(), "pipeline.resolved.yaml")
            data = build_data(self.cfg.data)

            if done:
                artifact = Artifact.load(self.out / done[-1]["name"])
            else:
                artifact = self._input_artifact(data, device, fingerprints[0])
            reference = self.summary["stages"][0]["metrics"]["model_bytes"]

            for spec in self.pipeline.stages[start:]:
                fp = fingerprints[spec.index + 1]
                stale = (previous or {}).get("stage_runs", {}).get(spec.name)
                self.tracker.mark_stale(stale)
                stage_run = self.tracker.start_stage(
                    spec.name, spec.type, spec.config.model_dump(mode="json"),
                    resume_id=stale if stale and resume else None)
                self._write_summary(running={"name": spec.name, "run_id": stage_run})
                artifact = self._run_stage(spec, artifact, data, device, fp, stage_run, reference)
                self.tracker.end(stage_run)
                stage_run = None
            self.summary["status"] = "finished"
            self._write_summary()
            self._log_pipeline_outputs(parent)
            self.tracker.end(parent)
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            self.summary["status"] = status.lower()
            if self.summary.get("stages") is not None:
                self._write_summary(running=self.summary.get("running"))
            for run_id in (stage_run, parent):
                # never mask the original error with a tracking error
                with contextlib.suppress(Exception):
                    self.tracker.end(run_id, status)
            raise
        finally:
            signal.signal(signal.SIGTERM, old_handler)
        return self.summary

    # -- stages -------------------------------------------------------------------------------

    def _input_artifact(self, data, device, fingerprint: str) -> Artifact:
        from .models import build_model

        model, spec = build_model(self.cfg.model, self.cfg.data)
        artifact = Artifact(model=model, spec=spec)
        record = self._save_and_measure(INPUT_STAGE, "input", artifact, data, device, fingerprint,
                                        None, reference=None, wall=0.0)
        self.tracker.log_metrics(self.summary["parent_run_id"],
                                 {f"input.{k}": v for k, v in record["metrics"].items()})
        return artifact

    def _run_stage(self, spec: StageSpec, artifact: Artifact, data, device, fingerprint: str,
                   run_id: str | None, reference: int) -> Artifact:
        stage = get_stage(spec.type)(spec.config, spec.name)
        ctx = StageContext(
            pipeline=self.pipeline, spec=spec, data=data, device=device,
            seed=self.cfg.seed + 1000 * (spec.index + 1), work_dir=self.out / ".work" / spec.name,
            fingerprint=fingerprint,
            log_metrics=lambda m, step=None: self.tracker.log_metrics(run_id, m, step),
            load_stage=self._load_stage,
        )
        print(f"== stage {spec.index + 1}/{len(self.pipeline.stages)}: {spec.name} ({spec.type})",
              flush=True)
        started = time.perf_counter()
        masks_before = dict(artifact.masks)
        artifact = stage.run(artifact, ctx)
        if not isinstance(artifact, Artifact):
            raise CompressPipeError(f"stage {spec.name!r} returned {type(artifact).__name__}, "
                                    "not an Artifact")
        wall = time.perf_counter() - started
        missing = set(masks_before) - set(artifact.masks)
        # a release (e.g. a new student architecture) is allowed once, by the stage that did it
        if missing and not artifact.meta.pop("masks_released", False):
            raise CompressPipeError(f"stage {spec.name!r} dropped the pruning masks of "
                                    f"{sorted(missing)[:3]}")
        record = self._save_and_measure(spec.name, spec.type, artifact, data, device, fingerprint,
                                        run_id, reference, wall, config=spec.config.model_dump(mode="json"))
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
        self.tracker.log_metrics(run_id, record["metrics"])
        self.tracker.log_artifact(run_id, self.out / spec.name, "artifact")
        self.tracker.log_text(run_id, json.dumps(record, indent=2), "stage_summary.json")
        return artifact

    def _save_and_measure(self, name: str, type_name: str, artifact: Artifact, data, device,
                          fingerprint: str, run_id: str | None, reference: int | None,
                          wall: float, config: dict | None = None) -> dict[str, Any]:
        """Save, reload from disk, and measure the reloaded model: numbers describe the file."""
        directory = self.out / name
        artifact.model.eval()
        artifact.lineage.append({"name": name, "type": type_name, "config": config or {}})
        files = artifact.save(directory)
        model_files = artifact.model_files()
        artifact.outputs, artifact.deploy = {}, None
        reloaded = Artifact.load(directory)
        if reloaded.masks:
            check_masks(reloaded.model, reloaded.masks, name)
        deployed = reloaded.deployed_model(directory)
        model_bytes = file_bytes(directory / f for f in model_files)
        counts = param_counts(reloaded.model)
        metrics: dict[str, float] = {
            # measured on the model rebuilt from the files on disk, in its deployed form
            **evaluate(deployed.to(device), data.test_loader(), device),
            **counts,
            "model_bytes": model_bytes,
            "artifact_bytes": sum(files.values()),
            "bits_per_weight": 8.0 * model_bytes / max(counts["params"], 1),
            "compression_ratio": (reference or model_bytes) / model_bytes,
            "wall_time_s": wall,
        }
        if reloaded.masks:
            stats = mask_stats(reloaded.model, reloaded.masks)
            metrics["masked_sparsity"] = stats["masked_sparsity"]
            self._log_layer_sparsity(run_id, name, stats["per_layer"])
        artifact.write_metrics(directory, metrics)
        record = {"name": name, "type": type_name, "fingerprint": fingerprint, "run_id": run_id,
                  "metrics": metrics, "files": files, "model_files": model_files}
        self.summary["stages"].append(record)
        self._write_summary()
        _print_record(record)
        return record

    def _log_layer_sparsity(self, run_id: str | None, name: str, per_layer: dict[str, float]) -> None:
        from .plots import layer_sparsity_plot

        self.tracker.log_metrics(run_id, {f"layer_sparsity.{k}": v for k, v in per_layer.items()})
        if run_id:
            plots = self.out / ".work" / "plots"
            plots.mkdir(parents=True, exist_ok=True)
            path = layer_sparsity_plot(per_layer, plots / f"{name}_layer_sparsity.png", name)
            self.tracker.log_artifact(run_id, path, "plots")

    def _load_stage(self, name: str) -> Artifact:
        directory = self.out / name
        if not (directory / MODEL_FILE).is_file():
            raise CompressPipeError(f"stage {name!r} has no saved output in {self.out}")
        return Artifact.load(directory)

    # -- summary and resume -------------------------------------------------------------------

    def _read_summary(self) -> dict[str, Any] | None:
        path = self.out / SUMMARY_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as exc:
            raise CompressPipeError(f"{path}: unreadable summary, cannot resume ({exc})") from exc

    def _completed(self, previous: dict | None, fingerprints: list[str]) -> list[dict[str, Any]]:
        """Leading stages whose saved output still matches the pipeline (same fingerprints)."""
        if not previous:
            return []
        names = [INPUT_STAGE] + [s.name for s in self.pipeline.stages]
        done = []
        for record, name, fp in zip(previous.get("stages", []), names, fingerprints):
            if record.get("name") != name or record.get("fingerprint") != fp:
                break
            if not (self.out / name / MODEL_FILE).is_file():
                break
            done.append(record)
        return done

    def _clear_outputs(self) -> None:
        """A fresh run replaces the stage outputs of an earlier one (the MLflow store stays)."""
        if not (self.out / SUMMARY_FILE).is_file():
            return
        previous = self._read_summary() or {}
        for record in previous.get("stages", []):
            shutil.rmtree(self.out / record["name"], ignore_errors=True)
        shutil.rmtree(self.out / ".work", ignore_errors=True)
        (self.out / SUMMARY_FILE).unlink(missing_ok=True)

    def _write_summary(self, running: dict | None = None) -> None:
        runs = self.summary.setdefault("stage_runs", {})
        for record in self.summary["stages"]:
            if record.get("run_id"):
                runs[record["name"]] = record["run_id"]
        if running is not None:
            self.summary["running"] = running
            if running.get("run_id"):
                runs[running["name"]] = running["run_id"]
        else:
            self.summary.pop("running", None)
        write_json(self.out / SUMMARY_FILE, self.summary)

    def _log_pipeline_outputs(self, parent: str | None) -> None:
        from .plots import size_accuracy_plot
        from .report import summary_table

        table = summary_table(self.summary)
        (self.out / "summary.md").write_text(table + "\n")
        plot = size_accuracy_plot(self.summary, self.out / "size_vs_accuracy.png")
        self.tracker.log_artifact(parent, self.out / SUMMARY_FILE)
        self.tracker.log_artifact(parent, self.out / "summary.md")
        self.tracker.log_artifact(parent, plot)
        final = self.summary["stages"][-1]["metrics"]
        self.tracker.log_metrics(parent, {f"final.{k}": final[k] for k in SUMMARY_METRICS
                                          if k in final})


def _raise_interrupted(signum, frame):
    raise Interrupted(f"received signal {signum}")


def _print_record(record: dict[str, Any]) -> None:
    m = record["metrics"]
    print(f"   {record['name']}: top1 {m['top1']:.2f}%  loss {m['loss']:.4f}  "
          f"{m['model_bytes']:,} bytes  ({m['compression_ratio']:.2f}x)  "
          f"sparsity {m['sparsity']:.1%}", flush=True)
