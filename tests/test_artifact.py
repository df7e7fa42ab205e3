"""The artifact round trip: save, reload in a fresh process, identical outputs; atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import timm
import torch

from compresspipe.core.artifact import MODEL_FILE, Artifact
from compresspipe.core.errors import ArtifactError

SPEC = {"source": "timm", "name": "test_resnet", "kwargs": {"in_chans": 1, "num_classes": 10}}

RELOAD = """
import sys, torch
from safetensors.torch import load_file, save_file
import compresspipe
art = compresspipe.load(sys.argv[1])
x = load_file(sys.argv[2])["x"]
with torch.no_grad():
    save_file({"y": art.model(x), **{f"mask.{k}": v for k, v in art.masks.items()},
               **{f"extra.{k}": v for k, v in art.extras.items()}}, sys.argv[3])
print(len(art.lineage), art.quant["scheme"])
"""


def _artifact() -> Artifact:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", **SPEC["kwargs"]).eval()
    mask = torch.rand_like(model.fc.weight) > 0.5
    with torch.no_grad():
        model.fc.weight.mul_(mask)
        for m in model.modules():  # non-trivial running statistics must survive too
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return Artifact(model=model, spec=SPEC, masks={"fc.weight": mask},
                    quant={"scheme": "none"}, extras={"rewind.fc.weight": torch.randn(10, 4)},
                    lineage=[{"name": "dense", "type": "train", "config": {}}])


def test_round_trip_in_fresh_process(tmp_path):
    from safetensors.torch import load_file, save_file

    art = _artifact()
    art.save(tmp_path / "a")
    x = torch.randn(8, 1, 16, 16)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    with torch.no_grad():
        expected = art.model(x)
    result = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "a"),
                             str(tmp_path / "x.safetensors"), str(tmp_path / "y.safetensors")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "none"]
    got = load_file(str(tmp_path / "y.safetensors"))
    assert torch.equal(got["y"], expected)  # bit-identical, not merely close
    assert torch.equal(got["mask.fc.weight"], art.masks["fc.weight"])
    assert torch.equal(got["extra.rewind.fc.weight"], art.extras["rewind.fc.weight"])


def test_no_pickle_on_disk(tmp_path):
    files = _artifact().save(tmp_path / "a")
    assert set(files) == {"artifact.json", "model.safetensors", "masks.safetensors",
                          "extras.safetensors"}
    meta = json.loads((tmp_path / "a" / "artifact.json").read_text())
    assert meta["spec"] == SPEC and meta["masks"] == ["fc.weight"]


def test_crash_during_save_leaves_old_artifact_intact(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "a"
    _artifact().save(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        _artifact().save(target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left behind


def test_load_rejects_mismatched_weights(tmp_path):
    art = _artifact()
    art.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "artifact.json").read_text())
    meta["spec"]["kwargs"]["num_classes"] = 7
    (tmp_path / "a" / "artifact.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="model.safetensors"):
        Artifact.load(tmp_path / "a")


def test_load_rejects_missing_and_future_versions(tmp_path):
    with pytest.raises(ArtifactError, match="not an artifact"):
        Artifact.load(tmp_path)
    _artifact().save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "artifact.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "a" / "artifact.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="format version 99"):
        Artifact.load(tmp_path / "a")
    assert (tmp_path / "a" / MODEL_FILE).is_file()
