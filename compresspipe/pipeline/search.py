"""Search over stage parameters with Optuna: each trial is one run of the pipeline with the
sampled values, an MLflow child run under the search's parent run.

Trials share the stage cache (pipeline/cache.py), so stages before the first searched one run
once for the whole search. The study lives in an RDB storage (``sqlite:///<output_dir>/search.db``
beside the MLflow database by default): running the same file again continues the search up to
``budget.trials`` (a trial a kill interrupted is marked failed and not counted).

Choosing (TPE's feedback, the constraint, the Pareto front, the best point) reads only what
``search_report.val_top1`` returns and the bytes; test accuracy is read, by
``search_report.test_top1``, for the chosen points only, when the report is written.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import optuna

from ..core.errors import CompressPipeError
from ..tracking.tracker import Tracker
from .cache import cache_dir
from .loader import load_pipeline
from .runner import run_pipeline
from .schema import PipelineFile
from .search_config import SearchConfig, SearchParameter, resolve
from .search_report import val_top1, write_report

STATE_FILE = "search.json"
TRIALS_DIR = "trials"
COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def run_search(pipeline: PipelineFile, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) the search a pipeline's ``search:`` section describes; return the
    report's paths and table."""
    return Search(pipeline).run()


class Search:
    def __init__(self, pipeline: PipelineFile):
        if pipeline.config.search is None:
            raise CompressPipeError(f"{pipeline.file}: no 'search:' section")
        self.pipeline = pipeline
        self.cfg: SearchConfig = pipeline.config.search
        self.out = pipeline.output_dir
        self.name = self.cfg.study or pipeline.config.name
        self.cache_root = cache_dir(pipeline.config.cache, self.out)
        self.tracker = Tracker(pipeline.config.tracking, self.out, pipeline.config.name)
        self.targets = {path: resolve(path, pipeline.stages) for path in self.cfg.parameters}
        ref = self.cfg.objective.reference or pipeline.stages[0].name
        self.reference_index = 1 + next(s.index for s in pipeline.stages if s.name == ref)
        self.reference: float | None = None
        self.executed = 0  # stage runs this process executed (not restored from the cache)

    # -- the study ----------------------------------------------------------------------------

    def storage_url(self) -> str:
        return self.cfg.storage or f"sqlite:///{(self.out / 'search.db').resolve()}"

    def study(self) -> optuna.Study:
        self.out.mkdir(parents=True, exist_ok=True)
        objective = self.cfg.objective
        sampler_seed = self.pipeline.config.seed
        constraints = None
        if objective.kind == "min_bytes":
            directions = ["minimize"]
            constraints = _constraint
        else:
            directions = ["maximize" if m == "val_top1" else "minimize" for m in objective.metrics]
        sampler = (optuna.samplers.TPESampler(seed=sampler_seed, constraints_func=constraints)
                   if self.cfg.sampler == "tpe" else
                   optuna.samplers.RandomSampler(seed=sampler_seed))
        pruner = (optuna.pruners.ThresholdPruner(
            upper=objective.max_val_top1_drop + self.cfg.prune_margin_pt)
            if self.cfg.prune_margin_pt is not None and len(directions) == 1
            else optuna.pruners.NopPruner())  # Optuna prunes single-objective studies only
        storage = optuna.storages.RDBStorage(self.storage_url())
        study = optuna.create_study(study_name=self.name, storage=storage, sampler=sampler,
                                    pruner=pruner, directions=directions, load_if_exists=True)
        for trial in study.get_trials(deepcopy=False,
                                      states=(optuna.trial.TrialState.RUNNING,)):
            # a killed search left it running: it is redone, not counted
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        return study

    def run(self) -> dict[str, Any]:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = self.study()
        parent = self._parent_run()
        started = time.monotonic()
        done = len(study.get_trials(deepcopy=False, states=COUNTED))
        todo = max(self.cfg.budget.trials - done, 0)
        print(f"== search {self.name!r}: {done} trials done, {todo} to go "
              f"(storage {self.storage_url()})", flush=True)
        if todo:
            timeout = self.cfg.budget.hours * 3600 if self.cfg.budget.hours else None
            study.optimize(lambda t: self._trial(t, parent), n_trials=todo, timeout=timeout,
                           catch=())
        result = write_report(self, study)
        result["wall_time_s"] = time.monotonic() - started
        result["stage_runs_executed"] = self.executed
        for key in ("report_md", "report_json", "plot", "best_yaml"):
            if result.get(key):
                self.tracker.log_artifact(parent, Path(result[key]))
        self.tracker.end(parent)
        return result

    def _parent_run(self) -> str | None:
        state_path = self.out / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        if state.get("study") != self.name:
            state = {}
        parent = self.tracker.start_pipeline(
            {"search": self.cfg.model_dump(mode="json"), "storage": self.storage_url()},
            resume_id=state.get("parent_run_id"))
        self.tracker.set_tag(parent, "compresspipe.search", self.name)
        state_path.write_text(json.dumps({"study": self.name, "parent_run_id": parent}) + "\n")
        return parent

    # -- one trial ----------------------------------------------------------------------------

    def trial_pipeline(self, values: dict[str, Any], output_dir: Path, name: str,
                       run_name: str | None = None, share_cache: bool = True) -> dict[str, Any]:
        """The pipeline file of one point: the searched file without its ``search:`` section,
        the values set at their paths. Plain data, as a YAML file would hold it."""
        raw = copy.deepcopy(self.pipeline.raw)
        raw.pop("search", None)
        for path, value in values.items():
            spec, fields = self.targets[path]
            item = raw["stages"][spec.index]
            holder = item.get(spec.type)
            if not isinstance(holder, dict):
                holder = item[spec.type] = {}
            for part in fields[:-1]:
                holder = holder.setdefault(part, {})
            holder[fields[-1]] = value
        raw["name"] = name
        raw["output_dir"] = str(output_dir)
        if share_cache:  # trials share the searched file's cache, wherever they write
            raw["cache"] = {**(raw.get("cache") or {}), "dir": str(self.cache_root)}
        if run_name is not None:
            tracking = dict(raw.get("tracking") or {})
            # a trial's logged models point at its stage directories, which keep the files
            # (twenty trials' copies of the same few .cpz sizes would outweigh one run);
            # best.yaml, run again, logs the chosen point's models with their files
            tracking.update(run_name=run_name, model_files="none",
                            experiment=tracking.get("experiment") or self.pipeline.config.name)
            if self.tracker.uri:
                tracking["uri"] = self.tracker.uri
            raw["tracking"] = tracking
        return raw

    def _trial(self, trial: optuna.Trial, parent: str | None) -> Any:
        values = {path: _suggest(trial, path, p) for path, p in self.cfg.parameters.items()}
        out = self.out / TRIALS_DIR / str(trial.number)
        raw = self.trial_pipeline(values, out, f"{self.pipeline.config.name}-trial{trial.number}",
                                  run_name=f"trial-{trial.number}")
        pipeline = load_pipeline(raw, check_model=False)
        print(f"== trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in values.items()),
              flush=True)
        trial.set_user_attr("values", values)
        trial.set_user_attr("output_dir", str(out))
        observer = _Observer(self, trial)
        try:
            summary = run_pipeline(pipeline, observer=observer, trial=True)
        finally:
            # the trial's scratch (plots already in MLflow, checkpoints of finished stages)
            shutil.rmtree(out / ".work", ignore_errors=True)
            self.executed += observer.executed
            run_id = observer.parent_run(out)
            self.tracker.set_tag(run_id, "mlflow.parentRunId", parent)
            self.tracker.set_tag(run_id, "compresspipe.search.trial", str(trial.number))
        final = summary["stages"][-1]["metrics"]
        bytes_, accuracy = int(final["model_bytes"]), val_top1(final)
        drop = (self.reference or accuracy) - accuracy
        trial.set_user_attr("bytes", bytes_)
        trial.set_user_attr("val_top1", accuracy)
        trial.set_user_attr("val_top1_drop", drop)
        trial.set_user_attr("constraint", drop - self.cfg.objective.max_val_top1_drop)
        trial.set_user_attr("stage_runs_executed", observer.executed)
        self.tracker.log_metrics(run_id, {"search.bytes": bytes_, "search.val_top1": accuracy,
                                          "search.val_top1_drop": drop})
        if self.cfg.objective.kind == "min_bytes":
            return bytes_
        return tuple(_objective_value(m, final, bytes_, accuracy)
                     for m in self.cfg.objective.metrics)


class _Observer:
    """Called by the runner after each stage of a trial: counts stage runs, reports the
    validation drop so far to Optuna, and stops a hopeless trial."""

    def __init__(self, search: Search, trial: optuna.Trial):
        self.search, self.trial = search, trial
        self.executed = 0
        self.index = 0

    def __call__(self, record: dict[str, Any]) -> None:
        index, self.index = self.index, self.index + 1
        if "cached_from_run" not in record:
            self.executed += 1
        accuracy = val_top1(record["metrics"])
        if index == self.search.reference_index:
            self.search.reference = accuracy
            self.trial.set_user_attr("reference_val_top1", accuracy)
        if index < self.search.reference_index or self.search.reference is None:
            return
        if len(self.trial.study.directions) == 1:
            self.trial.report(self.search.reference - accuracy, step=index)
            if self.trial.should_prune():
                print(f"   trial {self.trial.number} pruned after {record['name']}: validation "
                      f"top-1 {accuracy:.2f}% is too far below the reference", flush=True)
                raise optuna.TrialPruned()

    def parent_run(self, out: Path) -> str | None:
        try:
            return json.loads((out / "summary.json").read_text()).get("parent_run_id")
        except (OSError, ValueError):
            return None


def _constraint(trial: optuna.trial.FrozenTrial) -> list[float]:
    """<= 0: the trial meets the accuracy budget (TPE samples toward feasible points)."""
    return [trial.user_attrs.get("constraint", 1.0)]


def _suggest(trial: optuna.Trial, path: str, p: SearchParameter) -> Any:
    if p.choices is not None:
        index = trial.suggest_categorical(path + "#", list(range(len(p.choices))))
        return p.choices[index]  # by index: Optuna stores only plain scalars as choices
    if p.integer:
        return trial.suggest_int(path, int(p.low), int(p.high), step=int(p.step or 1),
                                 log=p.log)
    return trial.suggest_float(path, p.low, p.high, step=p.step, log=p.log)


def _objective_value(metric: str, final: dict[str, Any], bytes_: int, accuracy: float) -> float:
    if metric == "bytes":
        return float(bytes_)
    if metric == "val_top1":
        return accuracy
    if "latency_ms" not in final:
        raise CompressPipeError("search.objective.metrics names latency_ms, but the last "
                                "stage measured no latency_ms")
    return float(final["latency_ms"])
