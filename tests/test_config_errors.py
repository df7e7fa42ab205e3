"""Malformed pipeline files: each is rejected before any training, with a message that names the
file, the YAML path, the line and (for typos) a close match.

The cases are variants of one small valid pipeline (timm's ``test_resnet`` on 16x16 digits). In
each variant the line that the error must point at carries the comment ``# <-``; a case without
the marker expects no line (e.g. an empty file).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import compresspipe
import compresspipe.api
from compresspipe.core.errors import ConfigError
from compresspipe.pipeline.loader import load_pipeline
from compresspipe.stages import registry

MARK = "# <-"

BASE = """\
name: cfgtest
model:
  name: test_resnet
data:
  name: digits
  image_size: 16
stages:
  - name: dense
    train:
      epochs: 2
      lr: 0.1
"""
HEAD = BASE.split("stages:\n")[0]  # everything before the stages


def variant(*edits: tuple[str, str], append: str = "") -> str:
    """BASE with each ``old`` replaced by ``new``; ``old`` must occur exactly once."""
    text = BASE
    for old, new in edits:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in the base"
        text = text.replace(old, new)
    return text + append


def marked_line(text: str) -> int | None:
    lines = [n for n, line in enumerate(text.splitlines(), start=1) if MARK in line]
    assert len(lines) <= 1, "at most one marked line per case"
    return lines[0] if lines else None


# (id, yaml text, expected path, expected substrings of that problem's message)
CASES = [
    # --- the file itself -----------------------------------------------------------------------
    ("yaml_syntax_unclosed_flow",
     "name: cfgtest\nmodel: {name: test_resnet\ndata:  # <-\n  name: digits\n",
     "", ["invalid YAML", "expected ',' or '}'"]),
    ("yaml_syntax_bad_indent",
     variant(("  name: test_resnet\n", "  name: test_resnet\n   extra: 1  # <-\n")),
     "", ["invalid YAML", "mapping values are not allowed here"]),
    ("yaml_tab_indent",
     "name: cfgtest\nmodel:\n\tname: test_resnet  # <-\n",
     "", ["invalid YAML", "'\\t'"]),
    ("empty_file", "", "", ["expected a mapping at the top level", "found an empty file"]),
    ("only_comments", "# nothing here\n", "",
     ["expected a mapping at the top level", "found an empty file"]),
    ("top_level_list", "- train: {epochs: 1}\n- train: {epochs: 2}\n", "",
     ["expected a mapping at the top level", "found a list"]),
    ("top_level_scalar", "cfgtest\n", "", ["expected a mapping at the top level", "found a str"]),
    ("duplicate_top_level_key",
     variant(("data:\n", "model:  # <-\n  name: test_resnet\ndata:\n")),
     "model", ["duplicate key", "first defined on line 2"]),
    ("duplicate_nested_key",
     variant(("lr: 0.1\n", "lr: 0.1\n      lr: 0.2  # <-\n")),
     "stages[0].train.lr", ["duplicate key", "first defined on line 11"]),
    # --- unknown keys: typos get a close match ----------------------------------------------------
    ("typo_top_level_key", variant(("model:\n", "modle:  # <-\n")),
     "modle", ["unknown key 'modle'", "did you mean 'model'?", "allowed: name, seed"]),
    ("typo_data_key",
     variant(("image_size: 16\n", "image_size: 16\n  batchsize: 8  # <-\n")),
     "data.batchsize", ["unknown key 'batchsize'", "did you mean 'batch_size'?"]),
    ("typo_tracking_key", variant(append="tracking:\n  experimnt: x  # <-\n"),
     "tracking.experimnt", ["unknown key 'experimnt'", "did you mean 'experiment'?"]),
    ("typo_stage_param", variant(("epochs: 2", "epoch: 2  # <-")),
     "stages[0].train.epoch", ["unknown key 'epoch'", "did you mean 'epochs'?",
                               "allowed: epochs, optimizer, lr"]),
    # --- stage items ----------------------------------------------------------------------------
    ("typo_stage_type", variant(("    train:\n", "    trian:  # <-\n")),
     "stages[0].trian", ["unknown stage type 'trian'", "did you mean 'train'?", "known: "]),
    ("two_stage_type_keys",
     variant(("  - name: dense\n", "  - name: dense  # <-\n"), append="    prune: {}\n"),
     "stages[0]", ["expected exactly one stage type key besides 'name'", "found 'train', 'prune'"]),
    ("no_stage_type_key", variant(append="  - name: lonely  # <-\n"),
     "stages[1]", ["expected exactly one stage type key besides 'name'", "found none"]),
    ("stage_item_not_mapping", variant(append="  - train  # <-\n"),
     "stages[1]", ["expected a mapping like '- train: {...}'", "found 'train'"]),
    ("stage_params_null",
     HEAD + "stages:\n  - name: dense\n    train:  # <-\n",
     "stages[0].train", ["valid dictionary", "found None"]),
    ("empty_stages", HEAD + "stages: []  # <-\n", "stages", ["a pipeline needs at least one stage"]),
    ("stages_is_mapping", HEAD + "stages:  # <-\n  train: {epochs: 1}\n",
     "stages", ["valid list", "found {'train': {'epochs': 1}}"]),
    ("duplicate_stage_names", variant(append="  - name: dense  # <-\n    train: {epochs: 1}\n"),
     "stages[1].name", ["stage name 'dense' is already used by stages[0]"]),
    ("name_clashes_with_default_name",
     HEAD + "stages:\n  - train: {epochs: 1}\n  - name: train  # <-\n    train: {epochs: 1}\n",
     "stages[1].name", ["stage name 'train' is already used by stages[0]"]),
    ("bad_stage_name", variant(("name: dense", "name: 'two words'  # <-")),
     "stages[0].name", ["names may use letters, digits", "found 'two words'"]),
    ("third_party_stage_missing_module",
     variant(append="  - nonexistent_pkg.mod:Stage: {}  # <-\n"),
     "stages[1].nonexistent_pkg.mod:Stage",
     ["cannot import stage module 'nonexistent_pkg.mod'", "No module named 'nonexistent_pkg'"]),
    ("third_party_stage_not_a_stage", variant(append="  - os.path:join: {}  # <-\n"),
     "stages[1].os.path:join", ["'os.path:join' is not a compresspipe Stage subclass"]),
    # --- missing keys and wrong types ----------------------------------------------------------
    ("missing_model", variant(("name: cfgtest\n", "name: cfgtest  # <-\n"),
                              ("model:\n  name: test_resnet\n", "")),
     "model", ["required key is missing"]),
    ("missing_stages", HEAD.replace("name: cfgtest\n", "name: cfgtest  # <-\n"),
     "stages", ["required key is missing"]),
    ("epochs_not_int", variant(("epochs: 2", "epochs: many  # <-")),
     "stages[0].train.epochs", ["valid integer", "found 'many'"]),
    ("lr_is_list", variant(("lr: 0.1", "lr: [1]  # <-")),
     "stages[0].train.lr", ["valid number", "found [1]"]),
    ("nesterov_not_bool", variant(("lr: 0.1", "lr: 0.1\n      nesterov: maybe  # <-")),
     "stages[0].train.nesterov", ["valid boolean", "found 'maybe'"]),
    ("data_is_string",
     variant(("data:\n  name: digits\n  image_size: 16\n", "data: digits  # <-\n")),
     "data", ["valid dictionary", "found 'digits'"]),
    ("bad_pipeline_name", variant(("name: cfgtest\n", "name: 'my pipeline'  # <-\n")),
     "name", ["names may use letters, digits", "found 'my pipeline'"]),
    ("bad_device", variant(append="device: gpu  # <-\n"),
     "device", ["expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"]),
    # --- out of range ---------------------------------------------------------------------------
    ("negative_lr", variant(("lr: 0.1", "lr: -0.1  # <-")),
     "stages[0].train.lr", ["greater than 0", "found -0.1"]),
    ("label_smoothing_too_big",
     variant(("lr: 0.1", "lr: 0.1\n      label_smoothing: 1.5  # <-")),
     "stages[0].train.label_smoothing", ["less than 1", "found 1.5"]),
    ("image_size_too_small", variant(("image_size: 16", "image_size: 2  # <-")),
     "data.image_size", ["greater than or equal to 4", "found 2"]),
    ("momentum_one", variant(("lr: 0.1", "lr: 0.1\n      momentum: 1  # <-")),
     "stages[0].train.momentum", ["less than 1", "found 1"]),
    ("negative_seed", variant(append="seed: -1  # <-\n"),
     "seed", ["greater than or equal to 0", "found -1"]),
    ("warmup_longer_than_training",
     variant(("    train:\n", "    train:  # <-\n"), ("lr: 0.1", "lr: 0.1\n      warmup_epochs: 5")),
     "stages[0].train", ["warmup_epochs (5.0) exceeds epochs (2)"]),
    ("min_lr_above_lr",
     variant(("    train:\n", "    train:  # <-\n"), ("lr: 0.1", "lr: 0.1\n      min_lr: 0.2")),
     "stages[0].train", ["min_lr (0.2) must be below lr (0.1)"]),
    # --- bad literals: close matches ------------------------------------------------------------
    ("typo_optimizer", variant(("lr: 0.1", "lr: 0.1\n      optimizer: adamww  # <-")),
     "stages[0].train.optimizer",
     ["expected one of 'sgd', 'adamw'", "found 'adamww'", "did you mean 'adamw'?"]),
    ("typo_dataset", variant(("name: digits", "name: digit  # <-")),
     "data.name", ["expected one of 'digits', 'imagefolder'", "found 'digit'",
                   "did you mean 'digits'?"]),
    # --- the model ------------------------------------------------------------------------------
    ("unknown_timm_model_dash", variant(("name: test_resnet", "name: resnet-18  # <-")),
     "model.name", ["unknown timm model 'resnet-18'", "did you mean 'resnet18'?"]),
    ("unknown_timm_model_digit", variant(("name: test_resnet", "name: resnet181  # <-")),
     "model.name", ["unknown timm model 'resnet181'", "did you mean 'resnet18'?"]),
    ("model_name_and_factory",
     variant(("model:\n", "model:  # <-\n"),
             ("  name: test_resnet\n", "  name: test_resnet\n  factory: timm:create_model\n")),
     "model", ["give exactly one of 'name' (a timm model) or 'factory'"]),
    ("model_without_source",
     variant(("model:\n", "model:  # <-\n"), ("  name: test_resnet\n", "  pretrained: false\n")),
     "model", ["give exactly one of 'name' (a timm model) or 'factory'"]),
    ("factory_module_missing",
     variant(("name: test_resnet", "factory: nonexistent_pkg.models:make  # <-")),
     "model.factory", ["cannot import model factory module 'nonexistent_pkg.models'"]),
    ("model_kwarg_rejected",
     variant(("  name: test_resnet\n", "  name: test_resnet\n  kwargs: {bogus: 1}  # <-\n")),
     "model.kwargs", ["cannot build the model", "unexpected keyword argument 'bogus'"]),
    ("num_classes_mismatch",
     variant(("  name: test_resnet\n", "  name: test_resnet\n  kwargs: {num_classes: 7}  # <-\n")),
     "model.kwargs.num_classes", ["the model has 7 classes but dataset 'digits' has 10"]),
    ("num_classes_on_fixed_dataset",
     variant(("data:\n", "data:  # <-\n"), ("image_size: 16", "image_size: 16\n  num_classes: 5")),
     "data", ["'num_classes' is set by the dataset; only 'fake' takes it"]),
    ("freeze_pattern_matches_nothing",
     variant(("lr: 0.1", "lr: 0.1\n      freeze: ['stemm.*']  # <-")),
     "stages[0].train.freeze[0]",
     ["pattern 'stemm.*' matches no parameter of the model", "top-level names: bn1, conv1, fc"]),
    ("freeze_pattern_close_match",
     variant(("lr: 0.1", "lr: 0.1\n      freeze: ['fc.*', 'conv.*']  # <-")),
     "stages[0].train.freeze[1]",
     ["pattern 'conv.*' matches no parameter of the model", "did you mean 'conv1.*'?"]),
    ("freeze_everything", variant(("lr: 0.1", "lr: 0.1\n      freeze: ['*']  # <-")),
     "stages[0].train.freeze", ["these patterns freeze every parameter; nothing would train"]),
    # --- paths that must exist ------------------------------------------------------------------
    ("checkpoint_missing",
     variant(("  name: test_resnet\n",
              "  name: test_resnet\n  checkpoint: '{tmp}/nowhere.safetensors'  # <-\n")),
     "model.checkpoint", ["file not found", "nowhere.safetensors"]),
    ("imagefolder_root_missing",
     variant(("name: digits", "name: imagefolder\n  root: '{tmp}/no_such_dir'  # <-")),
     "data.root", ["directory not found", "no_such_dir"]),
    ("imagefolder_without_root",
     variant(("data:\n", "data:  # <-\n"), ("name: digits", "name: imagefolder")),
     "data.root", ["'imagefolder' needs a root directory"]),
    ("imagefolder_root_without_splits",
     variant(("name: digits", "name: imagefolder\n  root: '{tmp}'  # <-")),
     "data.root", ["no 'train' subdirectory"]),
    ("idx_files_missing",
     variant(("name: digits", "name: mnist\n  root: '{tmp}/mnist'  # <-")),
     "data.root", ["no mnist idx files in", "mnist", "set data.download: true"]),
    ("cifar_binary_files_missing",
     variant(("name: digits", "name: cifar10\n  root: '{tmp}'  # <-")),
     "data.root", ["no cifar10 binary files in", "set data.download: true",
                   "cifar-10-binary.tar.gz"]),
    ("digits_takes_no_root",
     variant(("image_size: 16", "image_size: 16\n  root: '{tmp}'  # <-")),
     "data.root", ["'digits' takes no root directory"]),
]

assert len(CASES) >= 24 and len({c[0] for c in CASES}) == len(CASES)
CASE_BY_ID = {c[0]: c for c in CASES}


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("{tmp}", str(tmp_path)), encoding="utf-8")
    return path


def where(line: int | None, path: str) -> str:
    """How a problem is located in the message: 'line 3, data.root', 'line 3', '' (no line)."""
    return ", ".join(([f"line {line}"] if line is not None else []) + ([path] if path else []))


def problem_matching(err: ConfigError, path: str, expected: list[str]):
    """The problem at ``path`` whose message has every expected substring (fails otherwise)."""
    at_path = [p for p in err.problems if p.path == path]
    assert at_path, f"no problem at {path!r}; got {err.problems}"
    for p in at_path:
        if all(s in p.message for s in expected):
            return p
    raise AssertionError(f"no problem at {path!r} says all of {expected}; got {at_path}")


@pytest.fixture
def no_training(monkeypatch):
    """Replace the runner: any call to it is recorded (and must not happen for a bad file)."""
    calls: list[tuple] = []
    monkeypatch.setattr(compresspipe.api, "run_pipeline",
                        lambda pipeline, resume=False: calls.append((pipeline, resume)) or {})
    return calls


@pytest.mark.parametrize(("text", "path", "expected"),
                         [pytest.param(t, p, e, id=i) for i, t, p, e in CASES])
def test_malformed_pipeline_is_rejected(tmp_path, no_training, text, path, expected):
    file = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        compresspipe.run(file)
    assert no_training == []  # rejected before the runner (and so any training) started
    err = info.value
    assert err.file == str(file)
    problem = problem_matching(err, path, expected)
    assert problem.line == marked_line(text)
    assert problem.source is None
    message = str(err)
    assert message.startswith(f"{file}: ")
    # the rendered problem (line, path, message) is part of the exception's message
    assert problem.render() in message
    located = where(problem.line, path)
    assert (f"{located}: {problem.message}" if located else problem.message) in message
    if path:
        assert path in message
    if problem.line is not None:
        assert f"line {problem.line}" in message


def test_stub_runner_sees_a_valid_pipeline(tmp_path, no_training):
    """The no_training stub really intercepts compresspipe.run (so the check above can fail)."""
    compresspipe.run(write(tmp_path, BASE), ["stages.0.train.epochs=3"])
    assert len(no_training) == 1
    pipeline, resume = no_training[0]
    assert resume is False
    assert [(s.name, s.type) for s in pipeline.stages][0] == ("dense", "train")
    assert pipeline.stages[0].config.epochs == 3


def test_imagefolder_root_without_splits_reports_both(tmp_path):
    _, text, _, _ = CASE_BY_ID["imagefolder_root_without_splits"]
    with pytest.raises(ConfigError) as info:
        load_pipeline(write(tmp_path, text))
    messages = [p.message for p in info.value.problems if p.path == "data.root"]
    assert messages == [f"no 'train' subdirectory in {tmp_path}",
                        f"no 'val' or 'test' subdirectory in {tmp_path}"]


# ---------------------------------------------------------------------------------------------
# --set overrides

OVERRIDE_CASES = [
    ("index_out_of_range", ["stages.3.train.epochs=3"], "stages[3]",
     ["no list item 3 (the list has 1)"]),
    ("last_index_out_of_range", ["stages.5=3"], "stages[5]", ["no list item 5 (the list has 1)"]),
    ("not_key_value", ["stages.0.train.epochs"], "stages.0.train.epochs",
     ["an override must look like 'path.to.key=value'"]),
    ("empty_key", ["=3"], "=3", ["an override must look like 'path.to.key=value'"]),
    ("key_inside_scalar", ["name.x=3"], "name.x", ["cannot set a key inside a str"]),
    ("value_not_yaml", ["name=[1"], "name", ["value '[1' is not valid YAML: expected ',' or ']'"]),
    ("makes_value_invalid", ["stages.0.train.lr=-1"], "stages[0].train.lr",
     ["greater than 0", "found -1"]),
    ("negative_index", ["stages.-1.train.lr=-1"], "stages[0].train.lr",
     ["greater than 0", "found -1"]),
    ("typo_in_override", ["stages.0.train.epoch=3"], "stages[0].train.epoch",
     ["unknown key 'epoch'", "did you mean 'epochs'?"]),
    ("new_section_typo", ["data.batch_size=8", "tracking.experimnt=x"], "tracking.experimnt",
     ["did you mean 'experiment'?"]),
]


@pytest.mark.parametrize(("overrides", "path", "expected"),
                         [pytest.param(o, p, e, id=i) for i, o, p, e in OVERRIDE_CASES])
def test_bad_override_is_rejected(tmp_path, no_training, overrides, path, expected):
    file = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as info:
        compresspipe.run(file, overrides)
    assert no_training == []
    problem = problem_matching(info.value, path, expected)
    assert problem.source == "--set"
    assert problem.line is None  # the bad value is not in the file
    assert f"{path} (from --set): " in str(info.value)


# ---------------------------------------------------------------------------------------------
# Several problems at once, line numbers, other sources


def test_all_problems_are_reported_together(tmp_path):
    text = variant(
        ("model:\n", "modle:\n"),                        # line 2
        ("image_size: 16", "image_size: 2"),             # line 6
        ("epochs: 2", "epochs: many"),                   # line 10
        ("lr: 0.1", "lr: 0.1\n      optimizer: adamww"),  # line 12
        append="device: gpu\n",                          # line 13
    )
    file = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_pipeline(file)
    err = info.value
    assert len(err.problems) >= 3
    lines = {p.path: p.line for p in err.problems}
    # the typo 'modle' is reported once, not also as "required key 'model' is missing"
    assert lines == {"modle": 2, "data.image_size": 6, "stages[0].train.epochs": 10,
                     "stages[0].train.optimizer": 12, "device": 13}
    message = str(err)
    assert message.splitlines()[0] == f"{file}: {len(err.problems)} problems"
    for path, line in lines.items():
        assert f"  - line {line}, {path}: " in message
    assert "did you mean 'model'?" in message
    assert "did you mean 'adamw'?" in message


def test_duplicate_key_line_numbers(tmp_path):
    text = variant(("lr: 0.1\n", "lr: 0.1\n      epochs: 3\n"))
    with pytest.raises(ConfigError) as info:
        load_pipeline(write(tmp_path, text))
    (problem,) = info.value.problems
    assert (problem.path, problem.line) == ("stages[0].train.epochs", 12)
    assert problem.message == "duplicate key (first defined on line 10)"


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_pipeline(tmp_path / "absent.yaml")
    assert str(info.value) == f"{tmp_path / 'absent.yaml'}: file not found"
    with pytest.raises(ConfigError) as info:
        load_pipeline(tmp_path)
    assert str(info.value) == f"{tmp_path}: not a file"


def test_dict_source_has_no_lines():
    with pytest.raises(ConfigError) as info:
        load_pipeline({"name": "cfgtest", "model": {"name": "test_resnet"},
                       "stages": [{"train": {"epoch": 1}}]})
    (problem,) = info.value.problems
    assert (problem.path, problem.line) == ("stages[0].train.epoch", None)
    assert str(info.value).startswith("<dict>: stages[0].train.epoch: unknown key 'epoch'")


STAGE_MODULE = '''
from pydantic import Field
from compresspipe.stages.base import Stage, StageConfig

class ScaleConfig(StageConfig):
    factor: float = Field(1.0, gt=0)

class Scale(Stage):
    Config = ScaleConfig

    def run(self, artifact, ctx):
        return artifact
'''


def test_paths_with_several_stage_types(tmp_path, monkeypatch):
    """With two stage types the item union is tagged; paths must not change because of it."""
    registry.list_stages()  # load the built-ins before isolating the registry
    monkeypatch.setattr(registry, "_STAGES", dict(registry._STAGES))
    (tmp_path / "cfgtest_stages.py").write_text(STAGE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cfgtest_stages", raising=False)
    text = (HEAD + "stages:\n"
            "  - name: 'two words'\n"                      # line 8
            "    train: {epochs: 1, warmup_epochs: 2}\n"   # line 9
            "  - cfgtest_stages:Scale:\n"                   # line 10
            "      factor: 0\n"                            # line 11
            "      facter: 2\n")                           # line 12
    try:
        with pytest.raises(ConfigError) as info:
            load_pipeline(write(tmp_path, text))
    finally:
        sys.modules.pop("cfgtest_stages", None)
    found = {p.path: (p.line, p.message) for p in info.value.problems}
    assert found == {
        "stages[0].name": (8, "names may use letters, digits, '_', '.' and '-' and start with a letter or digit, "
                              "found 'two words'"),
        "stages[0].train": (9, "warmup_epochs (2.0) exceeds epochs (1)"),
        "stages[1].cfgtest_stages:Scale.factor": (11, "input should be greater than 0, found 0"),
        "stages[1].cfgtest_stages:Scale.facter": (
            12, "unknown key 'facter'; did you mean 'factor'? (allowed: factor)"),
    }


# ---------------------------------------------------------------------------------------------
# Valid files


def test_valid_base_pipeline_loads(tmp_path):
    pipeline = load_pipeline(write(tmp_path, BASE))
    assert [(s.name, s.type, s.path) for s in pipeline.stages] == [
        ("dense", "train", "stages[0].train")]
    train = pipeline.stages[0].config
    assert (train.epochs, train.lr, train.optimizer) == (2, 0.1, "sgd")
    assert pipeline.config.model.name == "test_resnet"
    assert (pipeline.config.data.name, pipeline.config.data.image_size) == ("digits", 16)
    assert pipeline.file == str(tmp_path / "pipeline.yaml")


def test_valid_pipeline_with_defaults_and_overrides(tmp_path):
    text = HEAD + "stages:\n  - train: {epochs: 1}\n  - train: {epochs: 2, warmup_epochs: 2}\n"
    pipeline = load_pipeline(write(tmp_path, text),
                             ["stages.1.train.epochs=4", "data.batch_size=8"])
    assert [(s.name, s.type) for s in pipeline.stages] == [("train", "train"),
                                                           ("train-2", "train")]
    assert [s.config.epochs for s in pipeline.stages] == [1, 4]
    assert pipeline.config.data.batch_size == 8


def test_embedded_quickstart_is_valid():
    from compresspipe.cli import quickstart_path

    pipeline = load_pipeline(quickstart_path())
    assert [(s.name, s.type) for s in pipeline.stages][0] == ("dense", "train")


# ---------------------------------------------------------------------------------------------
# Command line


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "compresspipe", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def assert_config_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    for s in expected:
        assert s in result.stderr


@pytest.mark.parametrize("case_id", ["yaml_syntax_unclosed_flow", "empty_file",
                                     "typo_stage_param", "unknown_timm_model_dash"])
def test_cli_validate_rejects(tmp_path, case_id):
    _, text, path, expected = CASE_BY_ID[case_id]
    file = write(tmp_path, text)
    located = where(marked_line(text), path)
    prefix = f"error: {file}: {located}: " if located else f"error: {file}: "
    assert_config_error(cli("validate", str(file), cwd=tmp_path), prefix, *expected)


def test_cli_run_rejects_before_running(tmp_path):
    file = write(tmp_path, variant(("epochs: 2", "epoch: 2")))
    assert_config_error(cli("run", str(file), cwd=tmp_path),
                        f"{file}: line 10, stages[0].train.epoch: ", "did you mean 'epochs'?")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline.yaml"]  # no runs/ output


def test_cli_validate_valid_file(tmp_path):
    file = write(tmp_path, BASE)
    result = cli("validate", str(file), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{file}: valid; 1 stages: dense (train)"


def test_cli_set_is_applied(tmp_path):
    # warm-up longer than training is invalid; raising epochs with --set makes the file valid
    file = write(tmp_path, variant(("lr: 0.1", "lr: 0.1\n      warmup_epochs: 3")))
    assert_config_error(cli("validate", "--no-model-check", str(file), cwd=tmp_path),
                        "line 9, stages[0].train: warmup_epochs (3.0) exceeds epochs (2)")
    result = cli("validate", "--no-model-check", str(file), "--set", "stages.0.train.epochs=3",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid; 1 stages: dense (train)" in result.stdout


def test_cli_set_makes_valid_file_invalid(tmp_path):
    file = write(tmp_path, BASE)
    assert_config_error(
        cli("validate", str(file), "--set", "stages.0.train.lr=-1", cwd=tmp_path),
        f"{file}: stages[0].train.lr (from --set): input should be greater than 0, found -1")
    assert_config_error(
        cli("validate", str(file), "--set", "stages.0.train.epochs", cwd=tmp_path),
        "stages.0.train.epochs (from --set): an override must look like 'path.to.key=value'")
