"""Validation beyond the schema: each stage checked against the network it really receives, every
problem of a file reported at once (sorted by line), the checkpoint's tensors, pattern hints, and
the ``validate`` / ``stages`` commands."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compresspipe
import compresspipe.api
from compresspipe.cli import main
from compresspipe.core.errors import ConfigError
from compresspipe.pipeline.loader import load_pipeline

HEAD = """\
name: t
model: {name: test_resnet}
data: {name: digits, image_size: 16}
tracking: {enabled: false}
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("{tmp}", str(tmp_path)), encoding="utf-8")
    return path


def problems_of(source, **kwargs) -> dict[str, tuple[int | None, str]]:
    with pytest.raises(ConfigError) as info:
        load_pipeline(source, **kwargs)
    return {p.path: (p.line, p.message) for p in info.value.problems}


@pytest.fixture
def no_training(monkeypatch):
    """Any call to the runner is recorded (and must not happen for a bad file)."""
    calls: list = []
    monkeypatch.setattr(compresspipe.api, "run_pipeline",
                        lambda pipeline, resume=False: calls.append(pipeline) or {})
    return calls


# -- the architecture each stage receives -------------------------------------------------------


def test_stages_after_a_new_student_are_checked_against_the_student(tmp_path):
    text = HEAD + """\
stages:
  - train: {epochs: 1, freeze: ['layer1.*']}
  - distill: {teacher: 'stage:train', student: {name: test_efficientnet}}
  - prune: {sparsity: 0.5, include: ['blocks.*']}
  - train: {freeze: ['layer1.*']}
"""
    found = problems_of(write(tmp_path, text))
    # test_resnet's layer1 before the switch, test_efficientnet's blocks after it
    assert list(found) == ["stages[3].train.freeze[0]"]
    line, message = found["stages[3].train.freeze[0]"]
    assert line == 9
    assert "pattern 'layer1.*' matches no parameter" in message and "conv_stem" in message

    fixed = text.replace("  - train: {freeze: ['layer1.*']}", "  - train: {freeze: ['blocks.0.*']}")
    assert [s.type for s in load_pipeline(write(tmp_path, fixed)).stages][-1] == "train"


def test_a_student_that_cannot_be_built_stops_the_checks_after_it(tmp_path):
    text = HEAD + """\
stages:
  - train: {epochs: 1}
  - distill: {teacher: 'stage:train', student: {name: test_efficentnet}}
  - train: {freeze: ['blocks.*']}
"""
    found = problems_of(write(tmp_path, text))
    # the later freeze pattern may well fit the intended student: nothing is said of it
    assert list(found) == ["stages[1].distill.student.name"]


# -- every problem at once ----------------------------------------------------------------------


def test_all_problems_of_a_file_are_reported_sorted_by_line(tmp_path):
    text = """\
name: t
model: {name: test_resnet}
data: {name: imagefolder, root: {tmp}/nope, image_size: 16}
stages:
  - train: {epoch: 1, freeze: ["zzz.*"]}
  - distill: {teacher: "stage:nope"}
seed: -1
"""
    with pytest.raises(ConfigError) as info:
        load_pipeline(write(tmp_path, text))
    err = info.value
    found = [(p.line, p.path) for p in err.problems]
    assert found == [
        (3, "data.root"),
        (5, "stages[0].train.epoch"),  # the typo
        (5, "stages[0].train.freeze[0]"),  # checked although the stage has the typo
        (6, "stages[1].distill.teacher"),
        (7, "seed"),
    ]
    assert "directory not found" in err.problems[0].message
    assert "'zzz.*' matches no parameter" in err.problems[2].message
    assert "'stage:nope' does not name an earlier stage" in err.problems[3].message
    lines = str(err).splitlines()
    assert lines[0].endswith(": 5 problems")
    assert [int(line.split(",")[0].removeprefix("  - line ")) for line in lines[1:]] == \
        [3, 5, 5, 6, 7]


def test_broken_stage_neither_hides_nor_invents_problems(tmp_path):
    text = HEAD + """\
stages:
  - train: {epochs: 0.5, freeze: ['nothing.*']}
  - distill: {teacher: 'stage:train', alpha: -1, student: {name: test_efficientnet}}
  - prune: {include: ['blocks.*', 'nope.*']}
  - train
  - distill: {teacher: 'stage:dense'}
"""
    found = problems_of(write(tmp_path, text))
    assert set(found) == {
        "stages[0].train.epochs",  # a bad value: its stage is not checked against the model
        "stages[1].distill.alpha",  # broken, but its student parses: later stages get it
        "stages[2].prune.include[1]",
        "stages[3]",  # no stage: its name is unknown, so 'stage:dense' may name it
    }
    assert "'nope.*' matches no parameter" in found["stages[2].prune.include[1]"][1]


def test_dict_pipeline_with_a_broken_section_still_checks_the_stages():
    found = problems_of({"name": "t", "model": {"name": "test_resnet"},
                         "data": {"name": "digits", "image_size": 16, "augment": "maybe"},
                         "stages": [{"train": {"freeze": ["x.*"]}},
                                    {"distill": {"teacher": "stage:x"}}]})
    # the data failed: what depends on it (the model's input, classes) is not checked
    assert set(found) == {"data.augment", "stages[1].distill.teacher"}


# -- the checkpoint ------------------------------------------------------------------------------


def test_checkpoint_contents_are_checked_before_anything_runs(tmp_path, no_training):
    import timm
    from safetensors.torch import save_file

    wrong = timm.create_model("test_resnet", in_chans=1, num_classes=5)
    save_file({k: v.contiguous() for k, v in wrong.state_dict().items()},
              str(tmp_path / "five.safetensors"))
    torch.save({"x": [1, 2]}, tmp_path / "notsd.pt")
    good = timm.create_model("test_resnet", in_chans=1, num_classes=10).state_dict()
    torch.save({"state_dict": {k: v for k, v in good.items() if k != "fc.bias"}},
               tmp_path / "partial.pt")
    cases = {
        "five.safetensors": ["five.safetensors", "tensor 'fc.weight' has shape [5, 96], the "
                             "model expects [10, 96]"],
        "notsd.pt": ["notsd.pt", "expected a dict of tensors"],
        "partial.pt": ["partial.pt", "missing 'fc.bias'"],
    }
    for name, expected in cases.items():
        text = HEAD.replace("{name: test_resnet}", f"{{name: test_resnet, checkpoint: "
                            f"'{tmp_path / name}'}}") + f"output_dir: '{tmp_path}/out'\n" \
            "stages:\n  - train: {epochs: 1}\n"
        with pytest.raises(ConfigError) as info:
            compresspipe.run(write(tmp_path, text))
        (problem,) = info.value.problems
        assert (problem.path, problem.line) == ("model.checkpoint", 2), name
        assert all(s in problem.message for s in expected), problem.message
    assert no_training == [] and not (tmp_path / "out").exists()

    torch.save(good, tmp_path / "good.pt")
    text = HEAD.replace("{name: test_resnet}", f"{{name: test_resnet, checkpoint: "
                        f"'{tmp_path}/good.pt'}}") + "stages:\n  - train: {epochs: 1}\n"
    load_pipeline(write(tmp_path, text))


# -- data.channels for image sources --------------------------------------------------------------


def test_imagefolder_channels(tmp_path):
    import numpy as np
    from PIL import Image

    from compresspipe.core.config import DataConfig
    from compresspipe.core.data import build_data

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / split / cls / "0.png")
    for augment in (False, True):
        data = build_data(DataConfig(name="imagefolder", root=tmp_path, image_size=16,
                                     channels=1, augment=augment, val_split=0))
        assert data.train[0][0].shape == (1, 16, 16) and data.test[0][0].shape == (1, 16, 16)
        assert data.in_chans == 1
    text = (HEAD.replace("{name: digits, image_size: 16}",
                         "{name: imagefolder, root: '{tmp}', image_size: 16, channels: 1, val_split: 0}")
            + "stages:\n  - train: {epochs: 1}\n")
    pipeline = load_pipeline(write(tmp_path, text))
    assert pipeline.config.data.channels == 1
    found = problems_of(write(tmp_path, text.replace("channels: 1", "channels: 2")))
    assert found == {"data.channels": (3, "'imagefolder' images can be given 1 (grayscale) or "
                                          "3 (RGB) channels, not 2")}


# -- pattern hints and paths ------------------------------------------------------------------------


def test_pattern_hints_name_the_pattern_that_works(tmp_path):
    text = HEAD + """\
stages:
  - prune:
      exclude: [layer1, layr2.*, layer1.0.conv]
      overrides:
        fc: 0.5
        fc.wieght: 0.5
  - train: {freeze: [fc]}
"""
    found = problems_of(write(tmp_path, text))
    assert found == {
        "stages[0].prune.exclude[0]": (7, "pattern 'layer1' matches no parameter of the model "
                                          "but names a module; did you mean 'layer1.*'?"),
        "stages[0].prune.exclude[1]": (7, "pattern 'layr2.*' matches no parameter of the model; "
                                          "did you mean 'layer2.*'?"),
        "stages[0].prune.exclude[2]": (7, "pattern 'layer1.0.conv' matches no parameter of the "
                                          "model; did you mean 'layer1.0.conv*'?"),
        # the key is the path, on its own line, as for cluster's overrides
        "stages[0].prune.overrides.fc": (9, "pattern 'fc' matches no parameter of the model but "
                                            "names a module; did you mean 'fc.weight'?"),
        "stages[0].prune.overrides.fc.wieght": (10, "pattern 'fc.wieght' matches no "
                                                "parameter of the model; did you mean "
                                                "'fc.weight'?"),
        "stages[1].train.freeze[0]": (11, "pattern 'fc' matches no parameter of the model but "
                                          "names a module; did you mean 'fc.*'?"),
    }


# -- the command line ---------------------------------------------------------------------------


def test_validate_takes_several_files(tmp_path, capsys):
    stages = "stages:\n  - train: {epochs: 1}\n"
    good = write(tmp_path, HEAD + stages, "good.yaml")
    bad = write(tmp_path, HEAD + stages.replace("epochs", "epoch"), "bad.yaml")
    also_good = write(tmp_path, HEAD + stages, "also.yaml")
    assert main(["validate", str(good), str(bad), str(also_good), str(tmp_path / "no.yaml")]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{good}: valid; 1 stages: train (train)",
                                f"{also_good}: valid; 1 stages: train (train)"]
    assert err.splitlines() == [
        f"error: {bad}: line 6, stages[0].train.epoch: unknown key 'epoch'; did you mean "
        "'epochs'? (allowed: epochs, optimizer, lr, momentum, nesterov, betas, weight_decay, "
        "schedule, warmup_epochs, step_size, gamma, min_lr, label_smoothing, grad_clip, "
        "eval_every, freeze, record_rewind)",
        f"error: {tmp_path / 'no.yaml'}: file not found"]
    assert main(["validate", str(good), str(also_good)]) == 0


def test_stages_listing_is_readable(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    for noise in ("Annotated", "typing.", "Optional[", "<function", "compresspipe.", "pathlib"):
        assert noise not in out, noise
    assert max(len(line) for line in out.splitlines()) <= 100
    text = " ".join(line.strip() for line in out.splitlines())
    assert "teacher_checkpoint (path | null, default null)" in text
    assert "formats (list['cpz' | 'safetensors' | 'onnx' | 'torch_export'] | null" in text
    assert "features (list[FeatureDistill], default [])" in text
    assert "finetune (TrainConfig, default {epochs: 2, lr: 0.0005, weight_decay: 0.0})" in text
    # whole docstrings, not their first line
    assert ("export: Write the model as .cpz, safetensors, ONNX or torch.export files, each "
            "loaded in a fresh process") in text


def test_the_starting_model_can_be_the_teacher_but_not_a_stage_name(tmp_path):
    ok = write(tmp_path, HEAD + f"output_dir: {tmp_path}/out\nstages:\n"
               "  - distill: {teacher: 'stage:input', train: {epochs: 1}}\n")
    assert load_pipeline(ok).stages[0].config.teacher == "stage:input"
    bad = write(tmp_path, HEAD + f"output_dir: {tmp_path}/out\nstages:\n"
                "  - {name: input, train: {epochs: 1}}\n", "bad.yaml")
    found = problems_of(bad)
    assert "starting model" in found["stages[0].name"][1]
