"""The Python API: compresspipe.run / load / Pipeline, as public as the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_pipeline, write_yaml

import compresspipe
from compresspipe.core.errors import ArtifactError, ConfigError
from compresspipe.pipeline.loader import Pipeline
from compresspipe.stages.cluster import ClusterStage
from compresspipe.stages.train import TrainStage


@pytest.fixture(scope="module")
def coded(tmp_path_factory):
    """dense -> cluster -> huffman, run through Pipeline.from_dict(...).run()."""
    out = tmp_path_factory.mktemp("api")
    cfg = tiny_pipeline(out, epochs=1, tracking={"enabled": False})
    cfg["stages"] = [{"name": "dense", "train": TrainStage.Config(epochs=1, lr=0.05)},
                     {"cluster": ClusterStage.Config(conv_bits=4, linear_bits=4,
                                                     finetune={"epochs": 0})},
                     {"huffman": {}}]
    pipeline = compresspipe.Pipeline.from_dict(cfg)
    return out, pipeline, pipeline.run()


def test_public_names_are_lazy_and_pipeline_is_the_loaders_class():
    code = ("import sys, compresspipe; p = compresspipe.Pipeline; compresspipe.list_stages;"
            "print(p.__module__, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["compresspipe.pipeline.loader", "False"], result.stderr
    assert compresspipe.Pipeline is Pipeline
    assert all(getattr(compresspipe, name) is not None for name in compresspipe.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        compresspipe.nope  # noqa: B018


def test_pipeline_from_dict_takes_stage_config_objects(coded):
    out, pipeline, summary = coded
    assert [(s.name, s.type) for s in pipeline.stages] == [
        ("dense", "train"), ("cluster", "cluster"), ("huffman", "huffman")]
    assert pipeline.stages[1].config.conv_bits == 4 and pipeline.stages[1].config.finetune.epochs == 0
    assert repr(pipeline) == ("Pipeline('tiny', file='<dict>', stages=[dense (train), "
                              "cluster (cluster), huffman (huffman)])")
    assert summary["status"] == "finished" and summary["output_dir"] == str(out)
    assert [s["name"] for s in summary["stages"]] == ["input", "dense", "cluster", "huffman"]


def test_load_cpz_file_equals_the_deployed_artifact(coded):
    out, _, summary = coded
    from_dir = compresspipe.load(out / "huffman")
    from_cpz = compresspipe.load(out / "huffman" / "model.cpz")
    assert from_cpz.spec == from_dir.spec
    assert [step["name"] for step in from_cpz.lineage] == ["input", "dense", "cluster", "huffman"]
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        expected = from_dir.deployed_model(out / "huffman")(x)
        assert torch.equal(from_cpz.model(x), expected)
    assert not from_cpz.masks and not from_cpz.extras  # a .cpz is the model, not its state


def test_load_names_what_is_wrong(coded, tmp_path):
    out, _, _ = coded
    with pytest.raises(ArtifactError, match=r"tensors.json: not an artifact directory or a "
                                            r"\.cpz file \(load its directory"):
        compresspipe.load(out / "dense" / "tensors.json")
    with pytest.raises(ArtifactError, match="no such artifact directory or .cpz file"):
        compresspipe.load(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="not an artifact"):
        compresspipe.load(tmp_path)  # a directory without artifact.json
    broken = tmp_path / "broken.cpz"
    broken.write_bytes((out / "huffman" / "model.cpz").read_bytes()[:100])
    with pytest.raises(ArtifactError, match="broken.cpz"):
        compresspipe.load(broken)


def test_from_yaml_overrides_and_validate_after_edits(tmp_path):
    path = write_yaml(tmp_path / "p.yaml", tiny_pipeline(tmp_path / "out"))
    pipeline = compresspipe.Pipeline.from_yaml(path, ["stages.1.train.epochs=3"],
                                               check_model=False)
    assert pipeline.stages[1].config.epochs == 3
    assert pipeline.validate() is pipeline  # now with the model checks
    pipeline.stages[1].config.freeze = ["nothing.*"]
    with pytest.raises(ConfigError, match=r"stages\[1\]\.train\.freeze\[0\]: pattern 'nothing\.\*'"):
        pipeline.validate()
    pipeline.validate(check_model=False)  # the pattern is only checked against the model
    with pytest.raises(ConfigError, match="expected a dict"):
        compresspipe.Pipeline.from_dict(["not", "a", "dict"])
