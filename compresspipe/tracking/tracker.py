"""MLflow tracking: one parent run per pipeline, one nested run per stage, metrics in batches.

Uses MlflowClient with explicit run ids rather than mlflow's global "active run", so nothing
depends on hidden state and a resumed pipeline can reopen its runs.

Every call to the tracking store goes through :meth:`Tracker._call`: transient failures
(connection refused or reset, timeouts, HTTP 408/429/5xx, a locked database) are retried with
exponential backoff and jitter within ``tracking.retry_timeout_s``; then, or at once for any
other MLflow error, a :class:`~compresspipe.core.errors.TrackingError` naming the URI is raised.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ..core.errors import TrackingError
from ..core.signals import critical
from .config import TrackingConfig

MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch call
TRANSIENT_HTTP = frozenset({408, 429, 500, 502, 503, 504})
TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"})
BACKOFF_CAP_S = 10.0
REQUEST_TOKEN_TAG = "compresspipe.request_id"  # makes a retried create_run idempotent

T = TypeVar("T")


def tracking_uri(cfg: TrackingConfig, output_dir: Path) -> str:
    """Environment beats file beats the default sqlite database inside output_dir."""
    return (os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri
            or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}")


def redact(uri: str | None) -> str:
    """The URI without a password, fit for error messages and logs."""
    if not uri:
        return str(uri)
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


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


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def is_transient(exc: BaseException) -> bool:
    """Whether retrying could help: the server was unreachable, slow, overloaded or locked."""
    import requests  # lazy: with mlflow, whose HTTP errors these are

    # lazy: importing mlflow takes seconds; untracked runs never pay for it
    from mlflow.exceptions import MlflowException, RestException

    network = (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
               requests.exceptions.RetryError, requests.exceptions.ChunkedEncodingError,
               ConnectionError, TimeoutError)
    for e in _chain(exc):
        if isinstance(e, network):
            return True
        if isinstance(e, requests.exceptions.HTTPError) and e.response is not None:
            return e.response.status_code in TRANSIENT_HTTP  # artifact uploads raise these
        if isinstance(e, RestException) and e.get_http_status_code() in TRANSIENT_HTTP:
            return True
        if isinstance(e, MlflowException) and e.error_code in TRANSIENT_CODES:
            return True
    return False


def backoff_delays(base_s: float, cap_s: float = BACKOFF_CAP_S,
                   rng: random.Random | None = None) -> Iterator[float]:
    """Exponential backoff with "equal jitter": attempt n waits in [d/2, d], d = base * 2**n."""
    rng = rng or random.Random()
    n = 0
    while True:
        delay = min(cap_s, base_s * 2.0 ** n)
        yield delay / 2 + rng.uniform(0, delay / 2)
        n += 1


@contextlib.contextmanager
def _one_http_attempt(timeout_s: float) -> Iterator[None]:
    """MLflow's HTTP client retries on its own (7 times, up to minutes); our loop bounds the
    total wait, so each call makes one attempt with our timeout. MLflow reads these variables
    per request; they are restored at once so nothing else in the process sees them."""
    values = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s)))}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Tracker:
    """Logs one pipeline run. With tracking disabled every method is a no-op."""

    def __init__(self, cfg: TrackingConfig, output_dir: Path, pipeline_name: str,
                 sleep: Callable[[float], None] = time.sleep):
        self.enabled = cfg.enabled
        self.cfg, self.output_dir, self.pipeline_name = cfg, output_dir, pipeline_name
        self.uri = tracking_uri(cfg, output_dir) if cfg.enabled else None
        self.parent_id: str | None = None
        self._client = None
        self._experiment_id: str | None = None
        self._sleep = sleep
        # after a call gave up, later calls (closing runs on the error path) try only once
        self._unavailable = False

    @property
    def client(self):
        if self._client is None:
            # lazy: importing mlflow takes seconds; untracked runs never pay for it
            from mlflow.tracking import MlflowClient

            # the registry in the same store: mlflow would otherwise use the process's own
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` (a call of ``self.client``) with the tracker's retries and error messages:
        for the tracking modules that log models, datasets and registry entries."""
        return self._call(what, fn)

    def experiment_id(self) -> str:
        """The experiment this pipeline's runs go to (created when missing)."""
        return self._experiment()

    # -- retries ------------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` with transient failures retried; MLflow errors become TrackingError."""
        import requests  # lazy: with mlflow, whose HTTP errors these are

        # lazy: importing mlflow takes seconds; untracked runs never pay for it
        from mlflow.exceptions import MlflowException

        started = time.monotonic()
        deadline = started + self.cfg.retry_timeout_s
        retries = 0 if self._unavailable else self.cfg.retries
        delays = backoff_delays(self.cfg.retry_backoff_s)
        attempt = 0
        while True:
            attempt += 1
            try:
                # a SIGTERM mid-call could leave an sqlite transaction holding the lock
                with critical(), _one_http_attempt(self.cfg.request_timeout_s):
                    result = fn()
                self._unavailable = False
                return result
            except Exception as exc:
                transient = is_transient(exc)
                if not transient and not isinstance(
                        exc, MlflowException | requests.exceptions.RequestException):
                    raise  # a bug of ours or of mlflow's: keep its own type and traceback
                delay = next(delays)
                if transient and attempt <= retries and time.monotonic() + delay < deadline:
                    self._sleep(delay)
                    continue
                if transient:
                    self._unavailable = True
                raise self._error(what, exc, transient, attempt, time.monotonic() - started) \
                    from exc

    def _error(self, what: str, exc: Exception, transient: bool, attempts: int,
               waited: float) -> TrackingError:
        text = " ".join(str(e) for e in _chain(exc))
        known = re.search(r"Connection refused|Connection reset by peer|timed out|too many \d+ "
                          r"error responses|Remote end closed connection[\w ]*|database is locked",
                          text)
        reason = known.group(0) if known and transient else \
            (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        password = urlsplit(self.uri or "").password
        if password:  # mlflow's messages repeat the URL it called
            reason = reason.replace(password, "***")
        uri = redact(self.uri)
        code = getattr(exc, "error_code", None)
        if not transient:
            return TrackingError(f"MLflow tracking at {uri}: {what} failed: {reason}", uri=uri,
                                 transient=False, error_code=code)
        return TrackingError(
            f"MLflow tracking at {uri} is unavailable: {what} failed {attempts} time(s) over "
            f"{waited:.1f} s ({reason}). Completed stages are saved in {self.output_dir}; when "
            "the server is back, run again with --resume (tracking.retries and "
            "tracking.retry_timeout_s set how long to wait)",
            uri=uri, transient=True, error_code=code)

    # -- runs ---------------------------------------------------------------------------------

    def _experiment(self) -> str:
        if self._experiment_id is None:
            self._experiment_id = self._call("get or create experiment", self._get_or_create)
        return self._experiment_id

    def _get_or_create(self) -> str:
        # lazy: importing mlflow takes seconds; untracked runs never pay for it
        from mlflow.exceptions import MlflowException

        name = self.cfg.experiment or self.pipeline_name
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri and self.uri.startswith("sqlite:"):
            # keep artifacts beside the database, not in ./mlruns of the caller's cwd
            location = (self.output_dir / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            # another pipeline (or our own timed-out first attempt) created it meanwhile
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _create_run(self, run_name: str, tags: dict[str, str]) -> str:
        """create_run, retried without duplicates: a first attempt whose reply was lost may
        have created the run, so each retry first looks for the run carrying our token."""
        experiment = self._experiment()
        token = uuid.uuid4().hex
        tags = {**tags, REQUEST_TOKEN_TAG: token}
        attempts = 0

        def create() -> str:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                found = self.client.search_runs(
                    [experiment], filter_string=f"tags.`{REQUEST_TOKEN_TAG}` = '{token}'",
                    max_results=1)
                if found:
                    return found[0].info.run_id
            return self.client.create_run(experiment, run_name=run_name, tags=tags).info.run_id

        return self._call(f"create run {run_name!r}", create)

    def start_pipeline(self, params: dict[str, Any], resume_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        if resume_id is not None:
            self._call("reopen the pipeline run",
                       lambda: self.client.update_run(resume_id, status="RUNNING"))
            self.parent_id = resume_id
            return resume_id
        tags = {"compresspipe.pipeline": self.pipeline_name, **self.cfg.tags}
        self.parent_id = self._create_run(self.cfg.run_name or self.pipeline_name, tags)
        self.log_params(self.parent_id, params)
        return self.parent_id

    def start_stage(self, name: str, type_name: str, params: dict[str, Any],
                    resume_id: str | None = None) -> str | None:
        if not self.enabled:
            return None
        if resume_id is not None:
            self._call(f"reopen the run of stage {name!r}",
                       lambda: self.client.update_run(resume_id, status="RUNNING"))
            return resume_id
        run_id = self._create_run(name, {
            "mlflow.parentRunId": self.parent_id, "compresspipe.stage": name,
            "compresspipe.stage_type": type_name, **self.cfg.tags})
        self.log_params(run_id, params)
        return run_id

    def end(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id:
            self._call(f"mark run {run_id} {status}",
                       lambda: self.client.set_terminated(run_id, status=status))

    def status(self, run_id: str) -> str | None:
        """The run's status, or None when the store does not know the run."""
        try:
            return self._call(f"read run {run_id}", lambda: self.client.get_run(run_id)).info.status
        except TrackingError as exc:
            if exc.transient:
                raise
            return None  # deleted by the user, or another store: nothing to close

    def orphan_stage_run(self, name: str) -> str | None:
        """The RUNNING run of stage ``name`` under this pipeline run that no summary recorded
        (a SIGKILL between creating the run and writing summary.json): reused on resume, so
        a kill at any moment leaves one run per stage."""
        if not (self.enabled and self.parent_id):
            return None
        query = (f"tags.mlflow.parentRunId = '{self.parent_id}' and "
                 f"tags.`compresspipe.stage` = '{name}' and attributes.status = 'RUNNING'")
        runs = self._call(f"look up the run of stage {name!r}", lambda: self.client.search_runs(
            [self._experiment()], filter_string=query, max_results=1,
            order_by=["attributes.start_time DESC"]))
        return runs[0].info.run_id if runs else None

    def mark_stale(self, run_id: str | None, status: str = "KILLED") -> None:
        """A run a killed process left RUNNING: close it so no run stays RUNNING forever."""
        if self.enabled and run_id and self.status(run_id) == "RUNNING":
            self.end(run_id, status)

    def finish_completed(self, run_id: str | None, metrics: dict[str, float],
                         artifact_dir: Path | None = None) -> None:
        """A stage whose output was saved but whose run was not closed (the tracking server
        went away after the save): log what it missed and close it as FINISHED."""
        if not (self.enabled and run_id) or self.status(run_id) != "RUNNING":
            return
        self.log_metrics(run_id, metrics)
        if artifact_dir is not None and artifact_dir.is_dir():
            self.log_artifact(run_id, artifact_dir, "artifact")
        self.end(run_id)

    # -- logging ------------------------------------------------------------------------------

    def log_params(self, run_id: str | None, params: dict[str, Any]) -> None:
        if not (self.enabled and run_id):
            return
        # lazy: importing mlflow takes seconds; untracked runs never pay for it
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            batch = items[i: i + 100]
            self._call("log params", lambda b=batch: self.client.log_batch(run_id, params=b))

    def log_metrics(self, run_id: str | None, metrics: dict[str, float],
                    step: int | None = None, model_id: str | None = None,
                    dataset: tuple[str, str] | None = None) -> None:
        """All metrics in as few calls as MLflow allows (one per 1000); with ``model_id`` they
        are also the logged model's metrics, with ``dataset`` (name, digest) measured on it."""
        if not (self.enabled and run_id and metrics):
            return
        # lazy: importing mlflow takes seconds; untracked runs never pay for it
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        name, digest = dataset or (None, None)
        items = [Metric(k, float(v), now, step or 0, model_id=model_id, dataset_name=name,
                        dataset_digest=digest) for k, v in metrics.items()]
        for i in range(0, len(items), MAX_BATCH):
            batch = items[i: i + MAX_BATCH]
            self._call("log metrics", lambda b=batch: self.client.log_batch(run_id, metrics=b))

    def log_datasets(self, run_id: str | None, datasets: list[Any]) -> None:
        """``mlflow.log_input`` for each dataset record (``tracking.datasets.DatasetRecord``),
        its split as the context the UI shows."""
        if not (self.enabled and run_id and datasets):
            return
        # lazy: importing mlflow takes seconds; untracked runs never pay for it
        from mlflow.entities import DatasetInput, InputTag

        inputs = [DatasetInput(d.entity(), tags=[InputTag("mlflow.data.context", d.split)])
                  for d in datasets]
        self._call("log datasets", lambda: self.client.log_inputs(run_id, datasets=inputs))

    def log_artifact(self, run_id: str | None, path: Path, subdir: str | None = None) -> None:
        if self.enabled and run_id:
            if path.is_dir():
                self._call(f"upload {path.name}/",
                           lambda: self.client.log_artifacts(run_id, str(path), subdir))
            else:
                self._call(f"upload {path.name}",
                           lambda: self.client.log_artifact(run_id, str(path), subdir))

    def log_text(self, run_id: str | None, text: str, name: str) -> None:
        if self.enabled and run_id:
            self._call(f"upload {name}", lambda: self.client.log_text(run_id, text, name))

    def set_tag(self, run_id: str | None, key: str, value: str) -> None:
        if self.enabled and run_id:
            self._call(f"set tag {key}", lambda: self.client.set_tag(run_id, key, value))

    def log_onnx_model(self, run_id: str | None, path: Path, example: Any,
                       name: str = "model", tags: dict[str, str] | None = None,
                       params: dict[str, str] | None = None) -> str | None:
        """Log an ONNX file as an MLflow model of ``run_id`` (onnx flavour: nothing pickled),
        with ``example`` (a numpy batch) as input example and the signature it implies; return
        the model's URI, or None when tracking is off."""
        if not (self.enabled and run_id):
            return None
        import mlflow.onnx  # lazy: importing mlflow takes seconds; untracked runs never pay for it
        import onnx
        import onnxruntime as ort  # lazy: onnxruntime loads only where an ONNX model runs
        from mlflow.models import infer_signature

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        signature = infer_signature(example, session.run(
            None, {session.get_inputs()[0].name: example})[0])
        run = self._call(f"read run {run_id}", lambda: self.client.get_run(run_id))
        # created here, in the run's experiment: log_model alone would file it under the
        # process's active experiment
        model = self._call("create a logged model", lambda: self.client.create_logged_model(
            run.info.experiment_id, name=name, source_run_id=run_id, tags=tags, params=params))

        def log():
            with process_tracking_uri(self.uri):
                return mlflow.onnx.log_model(
                    onnx.load(str(path)), name=name, input_example=example, signature=signature,
                    run_id=run_id, model_id=model.model_id, save_as_external_data=False,
                    onnx_execution_providers=["CPUExecutionProvider"])

        return self._call(f"log model {path.name}", log).model_uri


@contextlib.contextmanager
def process_tracking_uri(uri: str | None) -> Iterator[None]:
    """mlflow's log_model talks to the process-wide tracking URI: point it at ours for the call,
    then restore it and the environment variable that set_tracking_uri also writes."""
    import mlflow  # lazy: importing mlflow takes seconds; untracked runs never pay for it

    env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env
