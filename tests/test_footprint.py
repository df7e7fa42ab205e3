"""Disk footprint: stage directories hold no tensor copies, a tensor carried through stages is
stored once, pruned and clustered tensors are stored compactly and exactly, MLflow gets a
pointer instead of copies, and every stage's artifact reloads bit for bit in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TESTS

import compresspipe
from compresspipe.core.store import TensorStore, manifest_objects, tensor_hash


def _pipeline(out):
    return {
        "name": "footprint", "seed": 0, "output_dir": str(out),
        "model": {"factory": "factories_for_tests:mlp", "kwargs": {"hidden": 64}},
        "data": {"name": "digits", "image_size": 8, "batch_size": 128, "limit_train": 256},
        "tracking": {"enabled": False},
        "stages": [
            {"name": "dense", "train": {"epochs": 1, "lr": 0.05, "record_rewind": {"epoch": 0.5}}},
            {"name": "prune", "prune": {"method": "oneshot", "sparsity": 0.9,
                                        "train": {"epochs": 1, "lr": 0.01}}},
            {"name": "cluster", "cluster": {"linear_bits": 4, "finetune": {"epochs": 0}}},
            {"name": "huffman", "huffman": {}},
        ],
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp") / "run"
    summary = compresspipe.run(_pipeline(out))
    return out, summary


def test_tensors_stored_once_and_compactly(run):
    out, summary = run
    stages = [s["name"] for s in summary["stages"]]
    store = TensorStore(out.parent / ".compresspipe-cache")
    for name in stages:
        assert not list((out / name).glob("*.safetensors")) or name == "cluster", name
        assert (out / name / "tensors.json").is_file()
    manifests = {n: json.loads((out / n / "tensors.json").read_text())["tensors"] for n in stages}
    # the rewind point rides along in every stage after dense: the same objects each time
    rewind = {k: v for k, v in manifests["dense"]["extras"].items() if k.startswith("rewind/")}
    assert rewind and all({k: manifests[n]["extras"][k] for k in rewind} == rewind
                          for n in ("prune", "cluster", "huffman"))
    # every object once: the store holds fewer bytes than the stage tensors it serves
    named = set().union(*(manifest_objects(out / n / "tensors.json") for n in stages))
    reloaded = [compresspipe.load(out / n) for n in stages]
    raw = sum(t.numel() * t.element_size() for a in reloaded
              for t in [*a.model.state_dict().values(), *a.masks.values(), *a.extras.values()])
    assert store.object_bytes(named) < raw / 3
    # compact: the 90 %-pruned, 4-bit clustered first layer in a fraction of its dense bytes
    weight = reloaded[stages.index("cluster")].model.state_dict()["1.weight"]
    digest = manifests["cluster"]["model"]["1.weight"]
    assert store.object_bytes({digest}) < 0.25 * weight.numel() * weight.element_size()
    assert tensor_hash(store.get(digest)) == digest == tensor_hash(weight)


def test_every_artifact_reloads_in_a_fresh_process(run):
    out, summary = run
    here = {s["name"]: _digests(compresspipe.load(out / s["name"])) for s in summary["stages"]}
    code = ("import json, sys; import compresspipe; from compresspipe.core.models import "
            "allow_factory; allow_factory('factories_for_tests:mlp'); from compresspipe.core.store import "
            "tensor_hash; a = {n: compresspipe.load(sys.argv[1] + '/' + n) for n in sys.argv[2:]};"
            "print(json.dumps({n: {g: {k: tensor_hash(t) for k, t in d.items()} for g, d in "
            "(('model', x.model.state_dict()), ('masks', x.masks), ('extras', x.extras))} "
            "for n, x in a.items()}))")
    proc = subprocess.run([sys.executable, "-c", code, str(out), *here], capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": f"{TESTS}:{ROOT}",
                                                       "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == here


def _digests(artifact) -> dict:
    return {g: {k: tensor_hash(t) for k, t in d.items()} for g, d in
            (("model", artifact.model.state_dict()), ("masks", artifact.masks),
             ("extras", artifact.extras))}


@pytest.mark.parametrize("make", [
    lambda: torch.randn(300, 7),
    lambda: torch.randn(500) * (torch.rand(500) > 0.9),
    lambda: torch.tensor([-0.0, 0.0, float("nan"), 1.0] * 50),
    lambda: torch.randint(0, 16, (1000,)).float() * 0.25,
    lambda: torch.rand(1000) > 0.7,
    lambda: torch.randint(0, 5, (400,), dtype=torch.int64),
    lambda: torch.randn(64).to(torch.bfloat16),
    lambda: torch.tensor(3),
])
def test_store_round_trip_is_exact(tmp_path, make):
    store = TensorStore(tmp_path)
    t = make()
    digest, new = store.put(t)
    assert new and not store.put(t)[1]
    back = store.get(digest)
    assert back.dtype == t.dtype and back.shape == t.shape and tensor_hash(back) == digest


def test_pruned_weights_are_sparse_whatever_the_sign_of_their_zeros(tmp_path):
    """w * mask leaves -0.0 where w was negative: still a zero of the sparse bitmap (3 % kept:
    about 0.28 bytes per weight, against 0.6 when -0.0 counted as a value), signs kept exactly."""
    torch.manual_seed(0)
    w = torch.randn(200_000) * (torch.rand(200_000) > 0.97)
    assert bool((torch.signbit(w) & (w == 0)).any())
    store = TensorStore(tmp_path)
    digest, _ = store.put(w)
    assert store.object_bytes({digest}) < 0.08 * w.numel() * w.element_size()
    back = store.get(digest)
    assert torch.equal(torch.signbit(back), torch.signbit(w)) and tensor_hash(back) == digest


def test_garbage_collection_leaves_another_process_write_in_flight(tmp_path):
    """A concurrent writer's ``.tmp.*`` file is neither an object nor garbage: listing and
    deleting it raced with its rename and failed the other process's stage."""
    store = TensorStore(tmp_path)
    digest, _ = store.put(torch.arange(6, dtype=torch.float32))
    in_flight = store.all_objects()[digest].parent / ".tmp.abc123"
    in_flight.write_bytes(b"half written")
    assert set(store.all_objects()) == {digest}
    store.collect_garbage(keep=set(), min_age_s=0.0)
    assert in_flight.exists() and store.all_objects() == {}
