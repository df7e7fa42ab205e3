"""Tracking against a real ``mlflow server`` (sqlite backend on 127.0.0.1, started by the test):
transient failures retried, a server that stays down fails the run clearly, --resume finishes it."""

from __future__ import annotations

import http.client
import http.server
import json
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import tiny_pipeline
from harness import MlflowServer, free_port
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    REQUEST_LIMIT_EXCEEDED,
    TEMPORARILY_UNAVAILABLE,
)
from mlflow.tracking import MlflowClient

import compresspipe
from compresspipe.core.artifact import Artifact
from compresspipe.core.errors import TrackingError
from compresspipe.stages.base import Stage
from compresspipe.tracking.config import TrackingConfig
from compresspipe.tracking.tracker import Tracker, backoff_delays, is_transient, redact

FAST_RETRY = {"retries": 8, "retry_timeout_s": 30.0, "retry_backoff_s": 0.02,
              "request_timeout_s": 20.0}


class FlakyProxy:
    """Forwards to the server, but answers 503 / 429 / 500, drops connections, or forwards and
    then loses the reply, on a fixed schedule. The first run creation always loses its reply:
    the server made the run, the client cannot know."""

    SCHEDULE = ("ok", "ok", 503, "ok", "drop", "ok", 429, "ok", "lost", "ok", 500, "ok")

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.injected: dict[str, int] = {}
        self.count = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy.fault(self.command, self.path)
                if fault == "drop":
                    self.close_connection = True
                    return
                if isinstance(fault, int):
                    payload = json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE",
                                          "message": "injected"}).encode()
                    self.send_response(fault)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", "content-length")}
                headers["Host"] = f"127.0.0.1:{proxy.upstream_port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "lost":
                    self.close_connection = True
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle  # noqa: N815

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def fault(self, method: str, path: str) -> str | int:
        with self.lock:
            if path.endswith("/runs/create") and "first-create" not in self.injected:
                fault: str | int = "lost"
                self.injected["first-create"] = 1
            else:
                fault = self.SCHEDULE[self.count % len(self.SCHEDULE)]
                self.count += 1
            if fault != "ok":
                self.injected[str(fault)] = self.injected.get(str(fault), 0) + 1
            return fault

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as srv:
        yield srv


def _runs(uri: str, experiment: str):
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} at {uri}"
    return client, client.search_runs([exp.experiment_id])


def _check_complete(uri: str, experiment: str, summary: dict) -> None:
    """Every run FINISHED, one per stage plus the parent, every measured metric present."""
    client, runs = _runs(uri, experiment)
    by_name = {r.info.run_name: r for r in runs}
    stages = [s for s in summary["stages"] if s["name"] != "input"]
    assert len(runs) == len(stages) + 1, sorted(by_name)  # a retried create made no duplicate
    assert {r.info.status for r in runs} == {"FINISHED"}
    for record in stages:
        run = by_name[record["name"]]
        assert set(record["metrics"]) <= set(run.data.metrics), record["name"]
        assert run.data.metrics["test_top1"] == pytest.approx(record["metrics"]["test_top1"])
        assert [a.path for a in client.list_artifacts(run.info.run_id)] != []
    parent = by_name[summary["pipeline"]]
    assert parent.data.metrics["final.test_top1"] == pytest.approx(stages[-1]["metrics"]["test_top1"])


def test_pipeline_through_a_flaky_server_completes(server, tmp_path):
    with FlakyProxy(server.port) as proxy:
        cfg = tiny_pipeline(tmp_path / "out", epochs=1, name="flaky",
                            tracking={"uri": proxy.url, **FAST_RETRY})
        cfg["stages"] = cfg["stages"][:1]
        summary = compresspipe.run(cfg)
    assert summary["status"] == "finished" and summary["tracking_uri"] == proxy.url
    assert {"503", "429", "500", "drop", "lost", "first-create"} <= set(proxy.injected)
    _check_complete(server.url, "flaky", summary)


_STOP_SERVER: list = []  # set by the outage test: stops the real server from inside a stage


class StopServer(Stage):
    """A stage that leaves the model unchanged and takes the tracking server down (once)."""

    def run(self, artifact, ctx):
        while _STOP_SERVER:
            _STOP_SERVER.pop()()
        return artifact


def test_server_down_mid_run_fails_clearly_then_resume_completes(server, tmp_path):
    out = tmp_path / "out"
    cfg = tiny_pipeline(out, epochs=1, name="outage",
                        tracking={"uri": server.url, "retries": 50, "retry_timeout_s": 2.0,
                                  "retry_backoff_s": 0.1, "request_timeout_s": 5.0})
    cfg["stages"][0] = {"name": "stop", "test_tracking_server:StopServer": {}}
    stopped_at: list[float] = []
    _STOP_SERVER.append(lambda: (server.stop(), stopped_at.append(time.monotonic())))

    with pytest.raises(TrackingError) as err:
        compresspipe.run(cfg)
    failed_after = time.monotonic() - stopped_at[0]
    message = str(err.value)
    assert server.url in message and "unavailable" in message and "--resume" in message
    assert err.value.transient and failed_after < 15  # bounded: 2 s of retries, then fast
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert [s["name"] for s in summary["stages"]] == ["input", "stop"]
    Artifact.load(out / "stop")  # what finished is on disk and loadable

    server.start()
    resumed = compresspipe.run(cfg, resume=True)
    assert resumed["status"] == "finished"
    assert [s["name"] for s in resumed["stages"]] == ["input", "stop", "finetune"]
    # the 'stop' run, saved but never closed while the server was down, got its metrics
    _check_complete(server.url, "outage", resumed)


def test_server_never_up_fails_within_the_budget(tmp_path):
    url = f"http://user:secret@127.0.0.1:{free_port()}"
    cfg = tiny_pipeline(tmp_path / "out", epochs=1,
                        tracking={"uri": url, "retries": 100, "retry_timeout_s": 1.0,
                                  "retry_backoff_s": 0.1})
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"http://user:\*\*\*@127\.0\.0\.1:\d+ is unavailable") \
            as err:
        compresspipe.run(cfg)
    assert "secret" not in str(err.value)
    assert time.monotonic() - started < 20  # pipeline loading included
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["status"] == "failed"


# -- the retry policy on its own ---------------------------------------------------------------


def _tracker(**cfg) -> tuple[Tracker, list[float]]:
    slept: list[float] = []
    tracker = Tracker(TrackingConfig(uri="http://127.0.0.1:1", **cfg), Path("."), "t",
                      sleep=slept.append)
    return tracker, slept


def _failing(errors: list[Exception], result: str = "ok"):
    calls = []

    def fn():
        calls.append(1)
        if errors:
            raise errors.pop(0)
        return result

    return fn, calls


def test_transient_errors_are_retried_with_growing_jittered_delays():
    tracker, slept = _tracker(retries=10, retry_timeout_s=1000, retry_backoff_s=1.0)
    errors = [requests.exceptions.ConnectionError("refused"),
              RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "locked"}),
              MlflowException("x", error_code=REQUEST_LIMIT_EXCEEDED),
              requests.exceptions.ReadTimeout("slow")]
    fn, calls = _failing(errors)
    assert tracker._call("log", fn) == "ok" and len(calls) == 5
    for n, delay in enumerate(slept):
        assert 2 ** n / 2 <= delay <= 2 ** n  # equal jitter around 1, 2, 4, 8 s


def test_retries_stop_at_the_count_and_later_calls_fail_fast():
    tracker, slept = _tracker(retries=3, retry_timeout_s=1000, retry_backoff_s=0.01)
    fn, calls = _failing([ConnectionRefusedError()] * 10)
    with pytest.raises(TrackingError, match="failed 4 time") as err:
        tracker._call("log metrics", fn)
    assert len(calls) == 4 and len(slept) == 3 and err.value.transient
    fn, calls = _failing([ConnectionRefusedError()] * 10)
    with pytest.raises(TrackingError, match="failed 1 time"):
        tracker._call("close run", fn)  # the error path must not wait again for each run
    assert len(calls) == 1


def test_retries_stop_at_the_deadline():
    tracker = Tracker(TrackingConfig(uri="http://127.0.0.1:1", retries=1000, retry_timeout_s=0.3,
                                     retry_backoff_s=0.02), Path("."), "t")
    fn, calls = _failing([TimeoutError()] * 1000)
    started = time.monotonic()
    with pytest.raises(TrackingError):
        tracker._call("log", fn)
    assert time.monotonic() - started < 0.3 + 0.1 and 3 <= len(calls) < 50


def test_permanent_errors_are_not_retried():
    tracker, slept = _tracker()
    fn, calls = _failing([RestException({"error_code": "INVALID_PARAMETER_VALUE",
                                         "message": "param changed"})])
    with pytest.raises(TrackingError, match="param changed") as err:
        tracker._call("log params", fn)
    assert len(calls) == 1 and not slept and not err.value.transient
    fn, calls = _failing([TypeError("a bug")])
    with pytest.raises(TypeError, match="a bug"):  # not ours to rename
        tracker._call("log", fn)


@pytest.mark.parametrize(("exc", "transient"), [
    (requests.exceptions.ConnectionError(), True),
    (requests.exceptions.RetryError("too many 503 error responses"), True),
    (RestException({"error_code": "503", "message": "x"}), True),
    (RestException({"error_code": "INTERNAL_ERROR", "message": "x"}), True),
    (RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "x"}), False),
    (MlflowException("x", error_code=TEMPORARILY_UNAVAILABLE), True),
    (MlflowException("x", error_code=INVALID_PARAMETER_VALUE), False),
    (ValueError("x"), False),
])
def test_transient_classification(exc, transient):
    assert is_transient(exc) is transient
    wrapped = MlflowException("API request failed")  # how mlflow reports a requests error
    wrapped.__context__ = exc
    assert is_transient(wrapped) is transient


def test_backoff_is_capped_and_redaction_hides_passwords():
    delays = backoff_delays(1.0, cap_s=4.0)
    assert all(d <= 4.0 for d in [next(delays) for _ in range(20)])
    assert redact("https://me:pw@host:5000/x") == "https://me:***@host:5000/x"
    assert redact("sqlite:///a.db") == "sqlite:///a.db"
