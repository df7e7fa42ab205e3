"""The pipeline loop: run stages in order, save and measure each artifact, track, resume.

Layout of ``output_dir``::

    input/, <stage>/...   one artifact per completed stage (atomic directories): metadata, the
                          deployable files and tensors.json, pointers into the tensor store
    summary.json          every completed stage with its metrics (rewritten after each stage)
    .work/<stage>/        epoch checkpoints of the stage in progress
    mlflow.db, mlartifacts/   the default MLflow store

The tensors live in the store of the stage cache (pipeline/cache.py; by default
``.compresspipe-cache`` beside ``output_dir``), written once however many stages and runs hold
them. A stage whose key (its resume fingerprint, which includes the library versions) is in the
cache is not run: its output is restored from there, and its MLflow run names the original run.

Under torchrun every rank runs every stage (training is data-parallel); only rank 0 creates
MLflow runs and writes files. After each stage all ranks continue from the artifact rank 0
wrote, received over the process group: masks, codebooks and quantization state are computed
once and broadcast by this one mechanism, and no filesystem needs to be shared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import signal
import time
from collections.abc import Callable
from typing import Any

import torch

from ..core import distributed
from ..core.artifact import TENSORS_FILE, Artifact, is_artifact, write_json
from ..core.data import build_data
from ..core.errors import CompressPipeError
from ..core.measure import check_masks, evaluate, file_bytes, mask_stats, param_counts
from ..core.models import allow_named_factories, build_model
from ..core.signals import raise_interrupted
from ..core.store import manifest_objects
from ..formats import inspect_cpz
from ..stages.context import StageContext
from ..stages.registry import get_stage, invariants
from ..stages.spec import INPUT_STAGE, StageSpec
from ..tracking import plots
from ..tracking.report import summary_table
from ..tracking.tracker import Tracker
from .cache import StageCache, cache_dir, cache_enabled, library_versions
from .checkpoints import local_model_config
from .mlflow_models import ModelTracking, StageLog
from .schema import NAME_PATTERN, PipelineFile
from .storage import StageStorage, print_record

SUMMARY_FILE = "summary.json"

# accuracy metrics carry their split: deployed_val_* (the saved model on the held-out
# validation split, what decisions use; plain val_* are the training loop's per-epoch curves)
# and test_* (the test set, reported only)
SUMMARY_METRICS = ("deployed_val_top1", "deployed_val_loss", "test_top1", "test_top5",
                   "test_loss", "model_bytes", "compression_ratio", "sparsity")


def run_pipeline(pipeline: PipelineFile, resume: bool = False,
                 observer: StageObserver | None = None, trial: bool = False) -> dict[str, Any]:
    """Run every stage; return the summary (also written to output_dir/summary.json).
    ``observer(record)`` is called after each stage (run or reused) with its summary record.
    ``trial``: one point of a search, whose Pareto report shows it (no summary.md, no
    size-vs-accuracy plot: summary.json has the numbers; MLflow gets no copies of what the
    trial's directory keeps: see StageStorage.is_trial)."""
    return Runner(pipeline, observer, pipeline_report=not trial).run(resume=resume)


StageObserver = Callable[[dict[str, Any]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return distributed.distributed_device(
            torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CompressPipeError(f"device: {name!r} requested but CUDA is not available")
    return distributed.distributed_device(device)


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Runner(StageStorage):
    def __init__(self, pipeline: PipelineFile, observer: StageObserver | None = None,
                 pipeline_report: bool = True):
        self.pipeline = pipeline
        self.cfg = pipeline.config
        self.out = pipeline.output_dir
        tracking = self.cfg.tracking
        if not distributed.is_main():  # one set of MLflow runs: rank 0's
            tracking = tracking.model_copy(update={"enabled": False})
        self.tracker = Tracker(tracking, self.out, self.cfg.name)
        self.models = ModelTracking(self.tracker, self.cfg, [s.name for s in pipeline.stages],
                                    self.out)
        self.summary: dict[str, Any] = {}
        self.observer = observer
        self.pipeline_report = pipeline_report
        self.stage_cache = StageCache(cache_dir(self.cfg.cache, self.out), self.cfg.cache.max_gb)
        # under torchrun every rank would have to agree on each hit: the cache is for one process
        self.use_cache = cache_enabled(self.cfg.cache) and distributed.world_size() == 1
        allow_named_factories(pipeline.raw)  # the artifacts it reloads may use them

    # -- fingerprints: a completed stage is reused on --resume only if nothing before it changed;
    # the same fingerprints are the keys of the cross-run stage cache (pipeline/cache.py)

    def fingerprints(self) -> list[str]:
        c = self.cfg
        fp = _digest(c.seed, c.model.model_dump(mode="json"), c.data.model_dump(mode="json"),
                     library_versions(), distributed.world_size())
        out = [fp]
        for s in self.pipeline.stages:
            fp = _digest(fp, s.name, s.type, s.config.model_dump(mode="json"))
            out.append(fp)
        return out

    def run(self, resume: bool = False) -> dict[str, Any]:
        device = resolve_device(self.cfg.device)
        created = distributed.init(device)  # under torchrun; otherwise nothing
        try:
            with distributed.quiet_unless_main():
                return self._run(resume, device)
        finally:
            if created:
                distributed.cleanup()

    def _run(self, resume: bool, device: torch.device) -> dict[str, Any]:
        torch.manual_seed(self.cfg.seed)
        fingerprints = self.fingerprints()
        previous, start = self._prepare(resume, fingerprints)
        old_handler = signal.signal(signal.SIGTERM, raise_interrupted)
        parent = None
        self._stage_run = None  # the open stage run, closed as FAILED or KILLED on an error
        try:
            parent = self._start_parent(previous)
            data = build_data(self.cfg.data)
            self.models.log_datasets(parent, data)
            artifact = self._starting_artifact(start, data, device, fingerprints[0])
            reference = (self.summary["stages"][0]["metrics"]["model_bytes"]
                         if distributed.is_main() else 0)
            for spec in self.pipeline.stages[start:]:
                fp = fingerprints[spec.index + 1]
                hit = self.stage_cache.lookup(fp) if self.use_cache else None
                if hit is not None:
                    self._reuse(spec.name, spec.type, hit, spec.config.model_dump(mode="json"))
                    artifact = None  # loaded from its directory when a later stage needs it
                    continue
                if artifact is None:
                    artifact = self._load_saved(self.summary["stages"][-1]["name"])
                artifact = self._tracked_stage(spec, artifact, data, device, fp, reference,
                                               previous, resume)
            self.summary["status"] = "finished"
            self._write_summary()
            self._log_pipeline_outputs(parent)
            self._register()
            self.tracker.end(parent)
            self.summary = distributed.broadcast_json(self.summary if distributed.is_main()
                                                      else None)
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            self.summary["status"] = status.lower()
            if self.summary.get("stages") is not None:
                self._write_summary(running=self.summary.get("running"))
            for run_id in (self._stage_run, parent):
                # never mask the original error with a tracking error
                with contextlib.suppress(Exception):
                    self.tracker.end(run_id, status)
            raise
        finally:
            signal.signal(signal.SIGTERM, old_handler)
        return self.summary

    def _prepare(self, resume: bool, fingerprints: list[str]) -> tuple[dict | None, int]:
        """Read (resume) or clear the previous outputs and start the summary; return the
        previous summary and the index of the first stage to run."""
        main = distributed.is_main()
        previous = self._read_summary() if resume and main else None
        if main:
            if not resume:
                self._clear_outputs()
            self.out.mkdir(parents=True, exist_ok=True)
        done = self._completed(previous, fingerprints)
        self._resumed = distributed.broadcast_json(len(done))  # the other ranks follow rank 0
        self.summary = {
            "pipeline": self.cfg.name, "status": "running", "output_dir": str(self.out),
            "tracking_uri": self.tracker.uri, "parent_run_id": None, "stages": done,
            "stage_runs": dict((previous or {}).get("stage_runs", {})),
        }
        return previous, max(self._resumed - 1, 0)

    def _start_parent(self, previous: dict | None) -> str | None:
        """Open (or, resuming, reopen) the pipeline's parent run."""
        parent = self.tracker.start_pipeline(
            {"seed": self.cfg.seed, "model": self.cfg.model.model_dump(mode="json"),
             "data": self.cfg.data.model_dump(mode="json"),
             "stages": [s.name for s in self.pipeline.stages]},
            resume_id=(previous or {}).get("parent_run_id"),
        )
        self.summary["parent_run_id"] = parent
        self._write_summary()  # a kill from here on resumes into this run, not a new one
        self.tracker.log_text(parent, self.pipeline.resolved_yaml(), "pipeline.resolved.yaml")
        return parent

    def _starting_artifact(self, start: int, data, device, fingerprint: str) -> Artifact | None:
        """The model the first stage to run receives: the last completed stage's output
        (resuming) or the pipeline's input model, shared by every rank."""
        done = self.summary["stages"]
        artifact = None  # a resuming rank other than 0 receives rank 0's below
        if self._resumed and distributed.is_main():
            artifact = self._load_saved(done[-1]["name"])
            for record in done[1:]:
                # saved, but the tracking server went away before the run was closed
                self.tracker.finish_completed(record.get("run_id"), record["metrics"],
                                              self.out / record["name"])
        elif not self._resumed:
            hit = self.stage_cache.lookup(fingerprint) if self.use_cache else None
            if hit is not None:
                self._reuse(INPUT_STAGE, "input", hit, None)
                return None
            artifact = self._input_artifact(data, device, fingerprint)
        return self._share(([INPUT_STAGE] + [s.name for s in self.pipeline.stages])[start],
                           artifact)

    def _tracked_stage(self, spec: StageSpec, artifact: Artifact, data, device, fp: str,
                       reference: int, previous: dict | None, resume: bool) -> Artifact:
        """One stage inside its own MLflow run (a stale run of an earlier attempt is marked)."""
        stale = ((previous or {}).get("stage_runs", {}).get(spec.name)
                 or (self.tracker.orphan_stage_run(spec.name) if resume else None))
        self.tracker.mark_stale(stale)
        self._stage_run = self.tracker.start_stage(
            spec.name, spec.type, spec.config.model_dump(mode="json"),
            resume_id=stale if stale and resume else None)
        self._write_summary(running={"name": spec.name, "run_id": self._stage_run})
        artifact = self._run_stage(spec, artifact, data, device, fp, self._stage_run, reference)
        artifact = self._share(spec.name, artifact)
        self.tracker.end(self._stage_run)
        self._stage_run = None
        return artifact

    # -- stages -------------------------------------------------------------------------------

    def _input_artifact(self, data, device, fingerprint: str) -> Artifact:
        model, spec = build_model(local_model_config(self.cfg), self.cfg.data)
        artifact = Artifact(model=model, spec=spec)
        if not distributed.is_main():
            return artifact
        record = self._save_and_measure(INPUT_STAGE, "input", artifact, data, device, fingerprint,
                                        None, reference=None, wall=0.0)
        self.tracker.log_metrics(self.summary["parent_run_id"],
                                 {f"input.{k}": v for k, v in record["metrics"].items()})
        return artifact

    def _run_stage(self, spec: StageSpec, artifact: Artifact, data, device, fingerprint: str,
                   run_id: str | None, reference: int) -> Artifact:
        stage = get_stage(spec.type)(spec.config, spec.name)
        log = StageLog(run_id)
        ctx = StageContext(
            name=spec.name, data=data, device=device,
            seed=self.cfg.seed + 1000 * (spec.index + 1), work_dir=self.out / ".work" / spec.name,
            fingerprint=fingerprint,
            log_metrics=self.models.stage_metrics(log),
            spec=spec, view=self.pipeline.view(spec.index), load_stage=self._load_stage,
            incoming=dict(self.summary["stages"][-1]["metrics"]) if self.summary["stages"] else {},
            log_model=self.models.onnx_model(spec, log, lambda: self.summary["stages"][-1]),
            on_train=self.models.on_train(log),
        )
        print(f"== stage {spec.index + 1}/{len(self.pipeline.stages)}: {spec.name} ({spec.type})",
              flush=True)
        started = time.perf_counter()
        masks_before = dict(artifact.masks)
        weights_before = None
        if stage.logs_weight_histograms and self.tracker.enabled:
            weights_before = plots.weight_arrays(artifact.model)
        artifact = stage.run(artifact, ctx)
        if not isinstance(artifact, Artifact):
            raise CompressPipeError(f"stage {spec.name!r} returned {type(artifact).__name__}, "
                                    "not an Artifact")
        wall = time.perf_counter() - started
        for invariant in invariants():
            invariant(stage, masks_before, artifact)
        if not distributed.is_main():
            return artifact  # rank 0 saves, measures and logs
        record = self._save_and_measure(spec.name, spec.type, artifact, data, device, fingerprint,
                                        run_id, reference, wall,
                                        config=spec.config.model_dump(mode="json"),
                                        weights_before=weights_before)
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
        self.models.log_stage(record, self.summary["stages"], data, log)
        self._write_summary()  # with the stage's model id
        self._log_stage_files(run_id, spec.name, record)
        if not self.is_trial:  # a trial's record is in its summary.json, beside its stages
            self.tracker.log_text(run_id, json.dumps(record, indent=2), "stage_summary.json")
        return artifact

    def _save_and_measure(self, name: str, type_name: str, artifact: Artifact, data, device,
                          fingerprint: str, run_id: str | None, reference: int | None,
                          wall: float, config: dict | None = None,
                          weights_before: dict | None = None) -> dict[str, Any]:
        """Save, reload from disk, and measure the reloaded model: numbers describe the file."""
        directory = self.out / name
        artifact.model.eval()
        artifact.lineage.append({"name": name, "type": type_name, "config": config or {}})
        files = artifact.save(directory, store=self.stage_cache.store)
        model_files = artifact.model_files()
        artifact.outputs, artifact.deploy = {}, None
        reloaded = Artifact.load(directory)
        if reloaded.masks:
            check_masks(reloaded.model, reloaded.masks, name)
        deployed = reloaded.deployed_model(directory)
        model_bytes = self._model_bytes(directory, model_files, reloaded)
        stored = self.stage_cache.store.object_bytes(manifest_objects(directory / TENSORS_FILE))
        counts = param_counts(reloaded.model)
        metrics: dict[str, float] = {
            # measured on the model rebuilt from the files on disk, in its deployed form
            **measure_splits(deployed.to(device), data, device),
            **counts,
            "model_bytes": model_bytes,
            # the directory plus the stored tensors it names (shared ones counted in full)
            "artifact_bytes": sum(files.values()) + stored,
            "bits_per_weight": 8.0 * model_bytes / max(counts["params"], 1),
            "compression_ratio": (reference or model_bytes) / model_bytes,
            "wall_time_s": wall,
        }
        if reloaded.masks:
            stats = mask_stats(reloaded.model, reloaded.masks)
            metrics["masked_sparsity"] = stats["masked_sparsity"]
            self._log_layer_sparsity(run_id, name, stats["per_layer"])
        self._log_stage_plots(run_id, name, directory, model_files, deployed, weights_before,
                              counts["params"])
        artifact.write_metrics(directory, metrics)
        record = {"name": name, "type": type_name, "fingerprint": fingerprint, "run_id": run_id,
                  "metrics": metrics, "files": files, "model_files": model_files}
        self.summary["stages"].append(record)
        self._write_summary()
        print_record(record)
        if self.use_cache:
            self.stage_cache.record(fingerprint, directory, record,
                                    run_id or self.summary.get("parent_run_id"), self.cfg.name,
                                    self.tracker.uri)
        if self.observer is not None:
            self.observer(record)
        return record

    def _register(self) -> None:
        registered = self.models.register(self.summary["stages"]) if distributed.is_main() \
            else None
        if registered:
            self.summary["registered"] = registered
            self._write_summary()

    def _log_layer_sparsity(self, run_id: str | None, name: str, per_layer: dict[str, float]) -> None:
        self.tracker.log_metrics(run_id, {f"layer_sparsity.{k}": v for k, v in per_layer.items()})
        if run_id:
            plot_dir = self.out / ".work" / "plots"
            plot_dir.mkdir(parents=True, exist_ok=True)
            path = plots.layer_sparsity_plot(per_layer, plot_dir / f"{name}_layer_sparsity.png",
                                             name)
            self.tracker.log_artifact(run_id, path, "plots")

    def _log_stage_plots(self, run_id: str | None, name: str, directory, model_files: list[str],
                         deployed, weights_before: dict | None, params: int) -> None:
        """Weight histograms of a quantizing stage; the bit budget of a .cpz deployable."""
        if not run_id:
            return

        out = self.out / ".work" / "plots"
        out.mkdir(parents=True, exist_ok=True)
        if weights_before:
            pairs, normalized = plots.deployed_weight_pairs(weights_before, deployed)
            if pairs:
                path = plots.weight_histogram_plot(pairs, normalized, out / f"{name}_weights.png",
                                                   name)
                self.tracker.log_artifact(run_id, path, "plots")
        for file in (f for f in model_files if f.endswith(".cpz")):
            rows = inspect_cpz(directory / file)
            bars = plots.cpz_breakdown(rows, file_bytes([directory / file]), params)
            path = plots.cpz_bits_plot(bars, out / f"{name}_cpz_bits.png", name)
            self.tracker.log_artifact(run_id, path, "plots")

    def _load_stage(self, name: str) -> Artifact:
        directory = self.out / name
        if not distributed.broadcast_json(is_artifact(directory)):
            raise CompressPipeError(f"stage {name!r} has no saved output in {self.out}")
        with distributed.shared_directory(directory) as received:
            return Artifact.load(received)

    def _share(self, name: str, artifact: Artifact | None) -> Artifact:
        """Under torchrun, every rank goes on with the artifact rank 0 saved as ``name`` (rank
        0 too, so all ranks hold the same objects), and with rank 0's random state."""
        if distributed.world_size() == 1:
            return artifact
        with distributed.shared_directory(self.out / name) as received:
            shared = Artifact.load(received)
        shared.deploy = None  # as for the in-memory artifact: a stage's output is not re-emitted
        distributed.sync_rng()
        local = None if artifact is None else {"masks": artifact.masks, "extras": artifact.extras,
                                                "state": artifact.model.state_dict()}
        distributed.record_digests(name, local=local, shared={
            "masks": shared.masks, "extras": shared.extras, "state": shared.model.state_dict()})
        return shared

    # -- summary and resume -------------------------------------------------------------------

    def _read_summary(self) -> dict[str, Any] | None:
        path = self.out / SUMMARY_FILE
        if not path.is_file():
            return None
        try:
            summary = json.loads(path.read_text())
        except ValueError as exc:
            raise CompressPipeError(f"{path}: unreadable summary, cannot resume ({exc})") from exc
        if not (isinstance(summary, dict) and isinstance(summary.get("stages", []), list)
                and all(isinstance(r, dict) for r in summary.get("stages", []))):
            raise CompressPipeError(f"{path}: not a compresspipe summary, cannot resume")
        return summary

    def _completed(self, previous: dict | None, fingerprints: list[str]) -> list[dict[str, Any]]:
        """Leading stages whose saved output still matches the pipeline (same fingerprints)."""
        if not previous:
            return []
        names = [INPUT_STAGE] + [s.name for s in self.pipeline.stages]
        done = []
        for record, name, fp in zip(previous.get("stages", []), names, fingerprints):
            if record.get("name") != name or record.get("fingerprint") != fp:
                break
            if not is_artifact(self.out / name):
                break
            done.append(record)
        return done

    def _clear_outputs(self) -> None:
        """A fresh run replaces the stage outputs of an earlier one (the MLflow store stays)."""
        if not (self.out / SUMMARY_FILE).is_file():
            return
        previous = self._read_summary() or {}
        for record in previous.get("stages", []):
            # summary.json is an editable file: only ever delete stage directories inside out
            if re.fullmatch(NAME_PATTERN, str(record.get("name", ""))):
                shutil.rmtree(self.out / record["name"], ignore_errors=True)
        shutil.rmtree(self.out / ".work", ignore_errors=True)
        (self.out / SUMMARY_FILE).unlink(missing_ok=True)

    def _write_summary(self, running: dict | None = None) -> None:
        if not distributed.is_main():
            return
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
        if not distributed.is_main():
            return
        if self.pipeline_report:
            self.tracker.log_artifact(parent, self.out / SUMMARY_FILE)
            (self.out / "summary.md").write_text(summary_table(self.summary) + "\n")
            self.tracker.log_artifact(parent, self.out / "summary.md")
            plot = plots.size_accuracy_plot(self.summary, self.out / "size_vs_accuracy.png")
            self.tracker.log_artifact(parent, plot)
        final = self.summary["stages"][-1]["metrics"]
        self.tracker.log_metrics(parent, {f"final.{k}": final[k] for k in SUMMARY_METRICS
                                          if k in final})


def measure_splits(model: torch.nn.Module, data, device) -> dict[str, float]:
    """``deployed_val_*`` metrics on the validation split (when there is one) and ``test_*``
    on the test set: every accuracy says which split it is from. (Not ``val_*``: those name
    the training loop's per-epoch curves, logged to the same MLflow run.)"""
    metrics = {f"test_{k}": v for k, v in evaluate(model, data.test_loader(), device).items()}
    if data.val is not None:
        metrics.update({f"deployed_val_{k}": v for k, v in
                        evaluate(model, data.val_loader(), device).items()})
    return metrics

