"""The runner's side of storage: what a stage's saved output weighs, a stage restored from the
cross-run cache instead of run, and what of a stage's output goes to MLflow (the deployable
files and a pointer, or a full copy)."""

from __future__ import annotations

import json
import math
import shutil
from typing import Any

from ..core.artifact import MODEL_FILE, TENSORS_FILE, Artifact
from ..core.measure import file_bytes
from .cache import Entry

SMALL_FILE = 1 << 20  # metadata (artifact.json, tensors.json, export.json): always logged


class StageStorage:
    """Mixed into runner.Runner; uses its out, cfg, tracker, stage_cache, summary, observer,
    pipeline_report."""

    @property
    def is_trial(self) -> bool:
        """One point of a search (run_pipeline(trial=True), which writes no pipeline report).
        Its MLflow runs get no copies of what its directory keeps (the stages' metadata and
        records, its summary.json; its logged models hold no files: search.py), only pointers:
        twenty trials' handfuls of small files outweighed the runs they logged."""
        return not self.pipeline_report

    def _model_bytes(self, directory, model_files: list[str], artifact: Artifact) -> int:
        """Bytes of the deployable files. A model deployed as plain safetensors is not kept in
        the stage directory (its tensors are in the store): it is written to a scratch file
        and measured, so the number is still the size of the file one would ship."""
        if model_files != [MODEL_FILE] or (directory / MODEL_FILE).is_file():
            return file_bytes(directory / f for f in model_files)
        scratch = self.out / ".work" / "measure"
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            bare = Artifact(model=artifact.model, spec=artifact.spec)
            return bare.save(scratch / "model")[MODEL_FILE]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    # -- the cross-run cache ----------------------------------------------------------------------

    def _reuse(self, name: str, type_name: str, entry: Entry, config: dict | None) -> None:
        """A stage whose key is in the cache: its output restored, not run."""
        directory = self.out / name
        self.stage_cache.restore(entry, directory)
        record = {**entry.record, "name": name, "fingerprint": entry.key,
                  "cached_from_run": entry.origin_run}
        if entry.origin_run and entry.info.get("tracking_uri") == self.tracker.uri:
            record["reused_in_store"] = True  # MLflow has its deployable already
        print(f"== {name} ({type_name}): reused from the stage cache (key {entry.key}, "
              f"first run {entry.origin_run or 'untracked'}, pipeline "
              f"{entry.info.get('pipeline')!r})", flush=True)
        parent = self.summary.get("parent_run_id")
        if config is None:  # the input model: metrics on the parent run, as when it is built
            run_id = None
            self.tracker.log_metrics(parent, {f"input.{k}": v
                                              for k, v in record["metrics"].items()})
        else:
            run_id = self.tracker.start_stage(name, type_name, config)
            self.tracker.log_metrics(run_id, record["metrics"])
            self._log_stage_files(run_id, name, record)
        for rid in (run_id,) if run_id else (parent,):
            self.tracker.set_tag(rid, f"compresspipe.cache.{name}.key" if rid == parent
                                 else "compresspipe.cache.key", entry.key)
            if rid == run_id:
                self.tracker.set_tag(rid, "compresspipe.stage_dir", str(directory.resolve()))
            if entry.origin_run:
                self.tracker.set_tag(rid, f"compresspipe.cache.{name}.reused_from_run"
                                     if rid == parent else "compresspipe.cache.reused_from_run",
                                     entry.origin_run)
        record["run_id"] = run_id
        self.tracker.end(run_id)
        self.summary["stages"].append(record)
        self._write_summary()
        print_record(record)
        if self.observer is not None:
            self.observer(record)

    def _load_saved(self, name: str) -> Artifact:
        """A saved stage output, as the next stage receives it."""
        artifact = Artifact.load(self.out / name)
        artifact.deploy = None  # as after a save: the next stage writes its own
        return artifact

    def _log_stage_files(self, run_id: str | None, name: str, record: dict[str, Any]) -> None:
        """MLflow gets the deployable files, the metadata and a pointer to the stored artifact
        (tracking.log_artifacts: pointer), or a full copy with every tensor (full)."""
        if not (self.tracker.enabled and run_id) or record.get("reused_in_store"):
            # reused, with its original run in this store: that run has the files, and this
            # run's tags name it, the cache key and the directory (no artifacts: a search's
            # trials would otherwise write a handful of small files each per reused stage)
            return
        directory = self.out / name
        if self.is_trial:
            # its directory keeps the files, the Pareto report its numbers, and best.yaml
            # re-runs the chosen point with everything logged
            self._log_pointer(run_id, name, record)
            return
        if self.cfg.tracking.log_artifacts == "full":
            full = self.out / ".work" / "full" / name
            self._load_saved(name).save(full)
            for f in directory.iterdir():  # the deployable files beside the tensors
                if f.is_file() and f.name != TENSORS_FILE and not (full / f.name).exists():
                    shutil.copy2(f, full / f.name)
            self.tracker.log_artifact(run_id, full, "artifact")
            shutil.rmtree(full.parent, ignore_errors=True)
            return
        deployable = set(record.get("model_files", []))
        # the deployable goes to MLflow once: in the stage's logged model when that holds files
        # (tracking.model_files), else here
        for f in (f for f in sorted(directory.iterdir()) if f.is_file()):
            # other large outputs (export's ONNX, which export logs as the run's MLflow model)
            # stay where pointer.json says
            if (not record.get("model_holds_files") if f.name in deployable
                    else f.stat().st_size <= SMALL_FILE):
                self.tracker.log_artifact(run_id, f, "artifact")
        self._log_pointer(run_id, name, record)

    def _log_pointer(self, run_id: str | None, name: str, record: dict[str, Any]) -> None:
        """artifact/pointer.json: where the stage's files are and how to load them."""
        directory = self.out / name
        pointer = {"directory": str(directory), "store": str(self.stage_cache.store.root),
                   "cache_key": record.get("fingerprint"),
                   "load": f"compresspipe.load({str(directory)!r})"}
        if record.get("model_holds_files") and record.get("model_id"):
            pointer["deployable"] = f"models:/{record['model_id']}"
        self.tracker.log_text(run_id, json.dumps(pointer, indent=2), "artifact/pointer.json")


def print_record(record: dict[str, Any]) -> None:
    """One line per stage: which split each accuracy is from, bytes, ratio, sparsity."""
    m = record["metrics"]
    val = f"val top1 {m['deployed_val_top1']:.2f}%  " if "deployed_val_top1" in m else ""
    print(f"   {record['name']}: {val}test top1 {m.get('test_top1', math.nan):.2f}%  "
          f"test loss {m.get('test_loss', math.nan):.4f}  "
          f"{m['model_bytes']:,} bytes  ({m['compression_ratio']:.2f}x)  "
          f"sparsity {m['sparsity']:.1%}", flush=True)
