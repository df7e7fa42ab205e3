"""Data-parallel runs under torchrun: one set of MLflow runs, identical replicas, sharded data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TESTS, tiny_pipeline, write_yaml
from mlflow.tracking import MlflowClient
from torch.utils.data import RandomSampler

import compresspipe
from compresspipe.core.data import ShardSampler
from compresspipe.core.distributed import DIGESTS_ENV, tensor_digest

TRAIN = 512  # digits limited to 512 training images, batches of 64
BATCH = 64


def _pipeline(out, **extra) -> dict:
    cfg = tiny_pipeline(out, **extra)
    cfg["data"].update(limit_train=TRAIN, batch_size=BATCH)
    cfg["stages"] = [
        {"name": "dense", "train": {"epochs": 1, "lr": 0.05}},
        {"name": "prune", "prune": {"sparsity": 0.8, "train": {"epochs": 1, "lr": 0.02}}},
    ]
    return cfg


def _torchrun(path, digests, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)]),
           "OMP_NUM_THREADS": "1", DIGESTS_ENV: str(digests)}
    env.pop("MLFLOW_TRACKING_URI", None)
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "compresspipe", "run", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "out"
    result = _torchrun(write_yaml(tmp / "tiny.yaml", _pipeline(out)), tmp / "digests")
    assert result.returncode == 0, result.stderr[-3000:]
    digests = {r: [json.loads(line) for line in (tmp / "digests" / f"rank{r}.jsonl").open()]
               for r in (0, 1)}
    return out, result, digests


def test_one_set_of_mlflow_runs(two_ranks):
    out, result, _ = two_ranks
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert [s["name"] for s in summary["stages"]] == ["input", "dense", "prune"]
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    experiments = client.search_experiments()
    assert [e.name for e in experiments if e.name != "Default"] == ["tiny"]
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert len(runs) == 3 and len(parents) == 1 and set(children) == {"dense", "prune"}
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
               for r in children.values())
    assert all(r.info.status == "FINISHED" for r in runs)
    # rank 1 prints nothing: the output is rank 0's alone
    assert result.stdout.count("== stage 2/2: prune") == 1
    assert result.stdout.count("| stage | type |") == 1


def test_replicas_and_masks_identical_on_both_ranks(two_ranks):
    out, _, digests = two_ranks
    assert [d["stage"] for d in digests[0]] == [d["stage"] for d in digests[1]] == \
        ["input", "dense", "prune"]
    for r0, r1 in zip(digests[0], digests[1], strict=True):
        assert r0["world_size"] == r1["world_size"] == 2
        # what each rank computed itself, before rank 0's artifact was broadcast: DDP kept the
        # weights identical and the masks came out the same on both ranks
        assert r0["local"] == r1["local"], r0["stage"]
        assert r0["shared"] == r1["shared"] == r0["local"], r0["stage"]
    saved = compresspipe.load(out / "prune")  # what rank 0 wrote
    assert saved.masks and digests[1][-1]["local"]["masks"] == tensor_digest(saved.masks)
    assert digests[1][-1]["local"]["state"] == tensor_digest(saved.model.state_dict())


def test_each_rank_trains_on_half_the_data(two_ranks):
    out, _, _ = two_ranks
    training = compresspipe.load(out / "dense").meta["training"]
    assert training["steps_per_epoch"] == math.ceil(math.ceil(TRAIN / 2) / BATCH)  # 4, not 8


def test_sharded_evaluation_equals_full_evaluation(two_ranks):
    out, _, _ = two_ranks
    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    for record in summary["stages"][1:]:
        run = client.get_run(record["run_id"])
        # the last epoch's val metrics were reduced over the two validation shards; the
        # stage's were measured by rank 0 alone on the whole validation split, from the file
        history = client.get_metric_history(run.info.run_id, "val_top1")
        assert history[-1].value == pytest.approx(record["metrics"]["deployed_val_top1"], rel=1e-9)
        loss = client.get_metric_history(run.info.run_id, "val_loss")[-1].value
        assert loss == pytest.approx(record["metrics"]["deployed_val_loss"], rel=1e-5)


def test_single_process_ignores_stray_rank(tmp_path, monkeypatch):
    # a RANK left in the environment without a multi-process WORLD_SIZE is not torchrun
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv(DIGESTS_ENV, str(tmp_path / "digests"))
    cfg = _pipeline(tmp_path / "out")
    cfg["stages"] = cfg["stages"][:1]
    summary = compresspipe.run(cfg)
    assert not torch.distributed.is_initialized()
    assert summary["status"] == "finished" and summary["parent_run_id"]
    assert (tmp_path / "out" / "summary.json").is_file()
    training = compresspipe.load(tmp_path / "out" / "dense").meta["training"]
    assert training["steps_per_epoch"] == math.ceil(TRAIN / BATCH)
    assert not (tmp_path / "digests").exists()  # nothing is broadcast in a single process


@pytest.mark.parametrize("n,world", [(10, 3), (12, 4), (2, 3)])  # (2, 3): ranks get repeats
def test_shards_of_an_epoch_are_the_single_process_epoch(n, world):
    def shards(seed):
        return [list(ShardSampler(RandomSampler(range(n), generator=torch.Generator()
                                                .manual_seed(seed)), r, world))
                for r in range(world)]

    order = list(RandomSampler(range(n), generator=torch.Generator().manual_seed(7)))
    parts = shards(7)
    per_rank = math.ceil(n / world)
    assert all(len(p) == per_rank for p in parts)  # the same number of steps on every rank
    interleaved = [parts[r][i] for i in range(per_rank) for r in range(world)]
    assert interleaved[:n] == order  # together, in turn: exactly the single-process order
    assert set(interleaved[n:]) <= set(order)  # padding repeats samples, invents none
    if n >= 10:
        assert shards(8) != parts  # reseeding the generator reshuffles
