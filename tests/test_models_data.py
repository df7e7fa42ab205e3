"""Model sources (timm, factory, checkpoints) and datasets (digits, fake, imagefolder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import compresspipe
from compresspipe.core.config import DataConfig, ModelConfig
from compresspipe.core.data import build_data
from compresspipe.core.errors import CompressPipeError
from compresspipe.core.models import build_model, read_checkpoint


def _factory_pipeline(out, **model):
    return {
        "name": "factory", "output_dir": str(out), "tracking": {"enabled": False},
        "model": {"factory": "factories_for_tests:mlp", "kwargs": {"img": 8}, **model},
        "data": {"name": "digits", "image_size": 8},
        "stages": [{"train": {"epochs": 2, "lr": 0.1}}],
    }


def test_factory_model_trains_and_reloads(tmp_path):
    summary = compresspipe.run(_factory_pipeline(tmp_path / "out"))
    assert summary["stages"][-1]["metrics"]["test_top1"] > 80
    art = compresspipe.load(tmp_path / "out" / "train")
    assert art.spec == {"source": "factory", "factory": "factories_for_tests:mlp",
                        "kwargs": {"img": 8, "in_chans": 1, "num_classes": 10}}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_starts_from_trained_weights(tmp_path, suffix):
    first = compresspipe.run(_factory_pipeline(tmp_path / "a"))
    trained = compresspipe.load(tmp_path / "a" / "train").model
    ckpt = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(trained.state_dict(), str(ckpt))
    else:
        torch.save({"state_dict": trained.state_dict()}, ckpt)
    second = compresspipe.run(_factory_pipeline(tmp_path / "b", checkpoint=str(ckpt)))
    # the new pipeline's *input* is the trained model, measured from its own file
    assert second["stages"][0]["metrics"]["test_top1"] == first["stages"][-1]["metrics"]["test_top1"]


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": np.float64(1.0).__reduce__}, path)
    with pytest.raises(CompressPipeError, match="weights-only"):
        read_checkpoint(path)


def test_checkpoint_shape_mismatch_names_tensor(tmp_path):
    from safetensors.torch import save_file

    save_file({"1.weight": torch.zeros(32, 64), "1.bias": torch.zeros(32),
               "3.weight": torch.zeros(7, 32), "3.bias": torch.zeros(7)}, str(tmp_path / "w.safetensors"))
    cfg = ModelConfig(factory="factories_for_tests:mlp", checkpoint=tmp_path / "w.safetensors")
    with pytest.raises(CompressPipeError, match=r"tensor '3\.(weight|bias)' has shape \[7"):
        build_model(cfg, DataConfig(name="digits", image_size=8))


def test_fake_data_is_learnable_and_configurable():
    data = build_data(DataConfig(name="fake", num_classes=3, channels=3, image_size=12,
                                 train_size=40, test_size=10))
    # the default validation split: 10% of the training images, held out
    assert (len(data.train), len(data.val), len(data.test), data.num_classes) == (36, 4, 10, 3)
    assert data.train[0][0].shape == (3, 12, 12)


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    data = build_data(DataConfig(name="imagefolder", root=tmp_path, image_size=16))
    assert data.num_classes == 2 and (len(data.train), len(data.val)) == (5, 1)
    x, y = data.train[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)
    pipeline = compresspipe.load_pipeline({
        "name": "folder", "model": {"name": "test_resnet"},
        "data": {"name": "imagefolder", "root": str(tmp_path), "image_size": 16},
        "stages": [{"train": {"epochs": 1}}],
    })
    assert pipeline.stages[0].type == "train"


def test_digits_grayscale_replicated_for_rgb_models():
    data = build_data(DataConfig(name="digits", image_size=8, channels=3))
    x, _ = data.test[0]
    assert x.shape == (3, 8, 8) and torch.equal(x[0], x[2])
