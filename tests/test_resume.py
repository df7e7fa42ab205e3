"""Kill a running pipeline with SIGKILL mid-stage; --resume must end with identical metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, TESTS, run_cli, tiny_pipeline, write_yaml
from mlflow.tracking import MlflowClient


def _pipeline(out):
    cfg = tiny_pipeline(out, epochs=8)
    cfg["data"]["image_size"] = 24  # slow enough that the kill lands inside the stage
    return cfg


def _metrics(summary):
    return {s["name"]: {k: v for k, v in s["metrics"].items()
                        if k not in ("wall_time_s", "artifact_bytes")}
            for s in summary["stages"]}


def test_sigkill_mid_stage_then_resume(tmp_path):
    reference = run_cli("run", str(write_yaml(tmp_path / "ref.yaml", _pipeline(tmp_path / "ref"))))
    assert reference.returncode == 0, reference.stderr
    expected = json.loads((tmp_path / "ref" / "summary.json").read_text())

    out = tmp_path / "killed"
    path = write_yaml(tmp_path / "killed.yaml", _pipeline(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    proc = subprocess.Popen([sys.executable, "-m", "compresspipe", "run", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / ".work" / "dense" / "train" / "checkpoint.safetensors"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    interrupted = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in interrupted["stages"]] == ["input"], "kill landed after the stage"
    assert interrupted["running"]["name"] == "dense"

    resumed = run_cli("run", str(path), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after epoch" in resumed.stdout
    final = json.loads((out / "summary.json").read_text())
    assert final["status"] == "finished"
    assert _metrics(final) == _metrics(expected)

    # the run the kill left RUNNING was reopened and closed: nothing stays RUNNING
    client = MlflowClient(tracking_uri=final["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    assert len(runs) == 3  # one parent and two stages, the interrupted ones reused


def test_resume_skips_completed_stages(tmp_path):
    path = write_yaml(tmp_path / "p.yaml", tiny_pipeline(tmp_path / "out", epochs=1))
    assert run_cli("run", str(path)).returncode == 0
    first = json.loads((tmp_path / "out" / "summary.json").read_text())
    again = run_cli("run", str(path), "--resume")
    assert again.returncode == 0, again.stderr
    assert "== stage" not in again.stdout  # nothing re-ran
    assert _metrics(json.loads((tmp_path / "out" / "summary.json").read_text())) == _metrics(first)
    # a changed stage config invalidates that stage and everything after it
    changed = run_cli("run", str(path), "--resume", "--set", "stages.1.train.lr=0.02")
    assert changed.returncode == 0, changed.stderr
    assert "== stage 1/2" not in changed.stdout and "== stage 2/2: finetune" in changed.stdout


def test_sigterm_marks_runs_killed(tmp_path):
    out = tmp_path / "term"
    path = write_yaml(tmp_path / "term.yaml", _pipeline(out))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    proc = subprocess.Popen([sys.executable, "-m", "compresspipe", "run", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = out / ".work" / "dense" / "train" / "checkpoint.safetensors"
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "killed"
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert {r.info.status for r in runs} == {"KILLED"} and len(runs) == 2


def test_resume_after_a_stage_with_a_deploy_form(tmp_path):
    """A resumed stage starts from the reloaded artifact exactly as an uninterrupted run starts
    from the saved one: the earlier stage's deployable form (here cluster's codebook file) is
    not carried into the next stage's output."""
    import compresspipe

    def pipeline(out, lr):
        cfg = tiny_pipeline(out, epochs=1, tracking={"enabled": False})
        cfg["stages"] = [
            {"name": "dense", "train": {"epochs": 1}},
            {"name": "cl", "cluster": {"finetune": {"epochs": 0}, "kmeans_iters": 3}},
            {"name": "ft", "train": {"epochs": 1, "lr": lr, "schedule": "constant"}}]
        return cfg

    compresspipe.run(pipeline(tmp_path / "a", 0.01))
    resumed = compresspipe.run(pipeline(tmp_path / "a", 0.02), resume=True)  # reruns ft only
    fresh = compresspipe.run(pipeline(tmp_path / "b", 0.02))
    assert resumed["stages"][-1]["model_files"] == ["model.safetensors"]
    assert _metrics(resumed) == _metrics(fresh)


def test_cpz_bytes_do_not_depend_on_timings(tmp_path):
    """A resumed run re-times its stages; the deployed file, and so model_bytes, must not change."""
    import timm

    from compresspipe.core.artifact import Artifact
    from compresspipe.formats.cpz_model import read_model_cpz, write_model_cpz

    spec = {"source": "timm", "name": "test_resnet", "kwargs": {"in_chans": 1, "num_classes": 10}}
    model = timm.create_model("test_resnet", **spec["kwargs"])
    for i, wall in enumerate((0.5, 1234.56789)):
        lineage = [{"name": "dense", "type": "train", "config": {},
                    "metrics": {"top1": 90.0, "wall_time_s": wall, "artifact_bytes": 1000 + i}}]
        write_model_cpz(Artifact(model=model, spec=spec, lineage=lineage), tmp_path / f"{i}.cpz")
    assert (tmp_path / "0.cpz").read_bytes() == (tmp_path / "1.cpz").read_bytes()
    assert read_model_cpz(tmp_path / "1.cpz").lineage[0]["metrics"] == {"top1": 90.0}


def test_resume_reuses_a_stage_run_no_summary_recorded(tmp_path):
    # a SIGKILL between creating a stage's MLflow run and writing summary.json leaves a RUNNING
    # run the summary does not know; --resume must adopt it, not add a second run
    import compresspipe

    out = tmp_path / "out"
    cfg = tiny_pipeline(out, epochs=1)
    summary = compresspipe.run(cfg)
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    orphan = summary["stage_runs"]["finetune"]
    client.update_run(orphan, status="RUNNING")
    saved = json.loads((out / "summary.json").read_text())
    saved["stages"] = saved["stages"][:-1]
    del saved["stage_runs"]["finetune"]
    (out / "summary.json").write_text(json.dumps(saved))

    resumed = compresspipe.run(cfg, resume=True)
    assert resumed["stage_runs"]["finetune"] == orphan
    runs = client.search_runs([client.get_run(orphan).info.experiment_id])
    assert len(runs) == 1 + len(cfg["stages"])  # parent + one per stage
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_sigterm_inside_a_tracking_call_waits_for_it_to_finish():
    # raised mid-call, the exception could leave an sqlite transaction holding the database lock
    # and the clean-up that marks runs KILLED would wait on it
    import pytest

    from compresspipe.core.signals import Interrupted, critical, raise_interrupted

    done = []
    with pytest.raises(Interrupted, match="signal 15"), critical():
        raise_interrupted(signal.SIGTERM, None)  # as if delivered here
        done.append("call finished")
    assert done == ["call finished"]
    with pytest.raises(Interrupted):  # outside a critical section: at once
        raise_interrupted(signal.SIGTERM, None)
    with critical():  # nothing pending any more
        pass
