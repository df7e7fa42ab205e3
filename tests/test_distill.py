"""Distillation: the KD loss by hand, the hook inside the one loop, teachers, the stage, errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_pipeline
from mlflow.tracking import MlflowClient
from torch import nn

import compresspipe
from compresspipe.compress.distill.config import DistillConfig
from compresspipe.compress.distill.hook import DistillHook, agreement
from compresspipe.compress.distill.losses import kd_loss
from compresspipe.core.config import DataConfig, TrainConfig
from compresspipe.core.data import build_data
from compresspipe.core.errors import ConfigError
from compresspipe.core.masks import MaskHook
from compresspipe.core.measure import evaluate
from compresspipe.core.models import build_from_spec
from compresspipe.core.training import Trainer, TrainHook
from compresspipe.stages.spec import PipelineView
from compresspipe.stages.teacher import (
    check_distill,
    load_teacher,
    resolve_teacher,
    stage_architecture,
)

CPU = torch.device("cpu")


# -- the loss -------------------------------------------------------------------------------


def _softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]



def _problems(cfg) -> dict[str, str]:
    """{YAML path: message} of the ConfigError the pipeline raises."""
    with pytest.raises(ConfigError) as info:
        compresspipe.load_pipeline(cfg)
    return {p.path: p.message for p in info.value.problems}

def test_kd_loss_equals_hand_computed_value():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.5]]
    t, alpha = 2.0, 0.7
    # KL(p_t || p_s) = sum_k p_t,k (log p_t,k - log p_s,k), averaged over the 2 rows, times T^2
    kl = [sum(pt * (math.log(pt) - math.log(ps))
              for pt, ps in zip(_softmax(zt, t), _softmax(zs, t)))
          for zs, zt in zip(student, teacher)]
    expected = t * t * sum(kl) / len(kl)
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), t)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.354905, abs=1e-6)  # cross-checked with scipy rel_entr

    class Fixed(nn.Module):  # a "teacher" that always answers the logits above
        def __init__(self):
            super().__init__()
            self.logits = nn.Parameter(torch.tensor(teacher))

        def forward(self, x):
            return self.logits[: len(x)]

    cfg = DistillConfig(teacher="x", temperature=t, alpha=alpha, gamma=0.3)
    hook = DistillHook(Fixed(), cfg, nn.Identity(), (1, 2, 2))
    terms = hook.extra_loss(nn.Identity(), torch.zeros(2, 1, 2, 2), torch.tensor(student),
                            torch.tensor([0, 1]))
    assert set(terms) == {"kd"}
    assert terms["kd"].item() == pytest.approx(alpha * expected, rel=1e-6)
    assert hook.ce_weight == 0.3
    assert kd_loss(torch.tensor(teacher), torch.tensor(teacher), t).item() == pytest.approx(0, abs=1e-6)


# -- the hook in the one training loop ------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return build_data(DataConfig(name="digits", image_size=8, batch_size=64, limit_train=256))


def _mlp(hidden: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _fit(model, data, hooks, epochs=2, lr=0.05):
    cfg = TrainConfig(epochs=epochs, lr=lr, schedule="constant")
    return Trainer(model, data, cfg, device=CPU, seed=0, hooks=hooks).fit()


def test_gamma_scales_the_task_loss(digits):
    """The Trainer weights its CE term by the hook's ce_weight (gamma)."""
    teacher = _mlp(48, seed=1)
    plain = _fit(_mlp(16, seed=0), digits, [], epochs=1, lr=1e-9)
    weighted = _fit(_mlp(16, seed=0), digits,
                    [DistillHook(teacher, DistillConfig(teacher="x", alpha=0.0, gamma=0.25),
                                 _mlp(16, 0), (1, 8, 8))], epochs=1, lr=1e-9)
    assert weighted[0]["train_ce"] == pytest.approx(0.25 * plain[0]["train_ce"], rel=1e-5)
    assert weighted[0]["train_kd"] == 0.0
    assert weighted[0]["train_loss"] == pytest.approx(weighted[0]["train_ce"], rel=1e-6)


def test_teacher_frozen_adapter_trained_masks_kept(digits):
    teacher, student = _mlp(48, seed=1), _mlp(16, seed=0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = DistillConfig(teacher="x", features=[{"student": "2", "teacher": "2", "weight": 0.5}])
    hook = DistillHook(teacher, cfg, student, (1, 8, 8))
    adapter = hook.modules()["distill_feat_2"]
    assert isinstance(adapter.proj, nn.Linear) and adapter.proj.weight.shape == (48, 16)
    adapter_before = adapter.proj.weight.detach().clone()
    mask = torch.rand_like(student[1].weight) > 0.5
    history = _fit(student, digits, [hook, MaskHook({"1.weight": mask})])

    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert not torch.equal(adapter.proj.weight, adapter_before)  # the one loop trained it
    assert torch.count_nonzero(student[1].weight[~mask]) == 0
    assert history[-1]["train_feat_2"] > 0 and history[-1]["train_kd"] > 0
    assert history[-1]["train_feat_2"] < history[0]["train_feat_2"]
    assert history[-1]["train_loss"] == pytest.approx(
        history[-1]["train_ce"] + history[-1]["train_kd"] + history[-1]["train_feat_2"], rel=1e-6)
    assert not student[2]._forward_hooks  # feature hooks are gone after the last epoch


def test_grad_clip_covers_the_feature_adapters(digits):
    """The clipped norm is that of everything the optimizer updates, adapters included."""
    clip = 1e-3
    norms: list[tuple[float, float]] = []

    class Norms(TrainHook):  # reads the gradients the optimizer has just applied
        def on_train_start(self, trainer):
            self.params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
            self.adapter = list(trainer.extra.parameters())

        def after_step(self, model, step):
            def norm(params):
                return torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]))
            norms.append((norm(self.params).item(), norm(self.adapter).item()))

    student = _mlp(16, seed=0)
    hook = DistillHook(_mlp(48, seed=1), DistillConfig(
        teacher="x", features=[{"student": "2", "teacher": "2"}]), student, (1, 8, 8))
    cfg = TrainConfig(epochs=1, lr=0.05, schedule="constant", grad_clip=clip)
    Trainer(student, digits, cfg, device=CPU, seed=0, hooks=[hook, Norms()]).fit()
    assert len(norms) == 4
    assert all(total <= clip * (1 + 1e-4) and adapter > 0 for total, adapter in norms)


def test_logit_cache_runs_the_teacher_once_per_image(digits):
    seen = []
    teacher = _mlp(48, seed=1)
    teacher.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    cached = DistillHook(teacher, DistillConfig(teacher="x", cache_teacher_logits=True),
                         _mlp(16, 0), (1, 8, 8))
    with_cache = _fit(_mlp(16, seed=0), digits, [cached], epochs=3)
    # every training image once, the test set once (the starting report) and the validation
    # split once (the per-epoch evaluation; predictions kept)
    assert sum(seen) - len(digits.test) - len(digits.val) == cached.cache.misses \
        == len(cached.cache) == 256

    seen.clear()
    without = _fit(_mlp(16, seed=0), digits,
                   [DistillHook(teacher, DistillConfig(teacher="x"), _mlp(16, 0), (1, 8, 8))],
                   epochs=3)
    assert sum(seen) == 3 * 256 + len(digits.test) + len(digits.val)
    for a, b in zip(with_cache, without):
        assert a["train_kd"] == pytest.approx(b["train_kd"], rel=1e-4)


def test_feature_distillation_rejects_cache():
    with pytest.raises(compresspipe.core.errors.CompressPipeError, match="cache_teacher_logits"):
        DistillHook(_mlp(8, 0), DistillConfig(teacher="x", cache_teacher_logits=True,
                                              features=[{"student": "1", "teacher": "1"}]),
                    _mlp(8, 0), (1, 8, 8))


# -- the stage in a pipeline ------------------------------------------------------------------


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """dense -> a toy mask -> KD in place with a feature pair -> KD into a new, smaller student."""
    out = tmp_path_factory.mktemp("distill") / "out"
    cfg = tiny_pipeline(out)
    cfg["stages"] = [
        {"name": "dense", "train": {"epochs": 2, "lr": 0.05}},
        {"name": "prune", "stages_for_tests:ZeroHalf": {}},
        {"name": "kd", "distill": {
            "teacher": "stage:dense", "features": [{"student": "layer3", "teacher": "layer3"}],
            "train": {"epochs": 2, "lr": 0.02}}},
        {"name": "small", "distill": {
            "teacher": "stage:dense", "student": {"name": "test_efficientnet"},
            "cache_teacher_logits": True, "train": {"epochs": 2, "lr": 0.05}}},
    ]
    summary = compresspipe.run(cfg)
    client = MlflowClient(summary["tracking_uri"])
    runs = {name: client.get_run(rid) for name, rid in summary["stage_runs"].items()}
    return out, summary, client, runs


def test_distill_stage_keeps_masks_and_logs(distilled):
    out, summary, client, runs = distilled
    art = compresspipe.load(out / "kd")
    mask = art.masks["fc.weight"]
    assert mask.sum() < mask.numel()
    assert torch.count_nonzero(art.model.fc.weight[~mask]) == 0
    metrics = runs["kd"].data.metrics
    records = {r["name"]: r["metrics"] for r in summary["stages"]}
    # the teacher is the dense stage's output, measured by the runner from its file
    assert metrics["teacher_top1"] == pytest.approx(records["dense"]["test_top1"])
    assert metrics["student_top1"] == pytest.approx(records["kd"]["test_top1"])
    assert 0 <= metrics["agreement"] <= 100
    # KD recovers part of what the mask destroyed
    assert records["kd"]["test_top1"] > records["prune"]["test_top1"]
    for curve in ("train_kd", "train_ce", "train_feat_layer3"):
        history = client.get_metric_history(runs["kd"].info.run_id, curve)
        assert [m.step for m in history] == [1, 2] and all(m.value > 0 for m in history), curve


def test_new_student_replaces_the_model(distilled):
    out, summary, _, runs = distilled
    art = compresspipe.load(out / "small")  # reloads from its own spec
    assert art.spec["name"] == "test_efficientnet" and not art.masks
    records = {r["name"]: r["metrics"] for r in summary["stages"]}
    assert records["small"]["params"] < records["dense"]["params"] / 3
    assert records["small"]["model_bytes"] < records["dense"]["model_bytes"] / 3
    assert records["small"]["test_top1"] > 70.0
    metrics = runs["small"].data.metrics
    assert metrics["teacher_cache_images"] == 1293  # every digits training image, once
    assert metrics["agreement"] > 70.0


def test_teacher_from_path_checkpoint_and_mlflow_uri(distilled, tmp_path):
    from safetensors.torch import save_file

    out, summary, _, _ = distilled
    dense = compresspipe.load(out / "dense").model.state_dict()
    pipeline = compresspipe.load_pipeline(tiny_pipeline(out), check_model=False).config
    ckpt = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.items()}, str(ckpt))
    sources = [str(out / "dense"), str(ckpt), f"runs:/{summary['stage_runs']['dense']}/artifact"]
    for source in sources:
        teacher = load_teacher(DistillConfig(teacher=source), pipeline)
        assert all(torch.equal(dense[k], v) for k, v in teacher.state_dict().items()), source
    ctx = SimpleNamespace(view=pipeline,
                          load_stage=lambda name: compresspipe.load(out / name))
    teacher = resolve_teacher(DistillConfig(teacher="stage:dense"), ctx)
    assert all(torch.equal(dense[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


# -- validation -------------------------------------------------------------------------------


def _checkpoint(path, **kwargs):
    """A test_resnet state dict (1-channel, 10 classes unless told) as a safetensors file."""
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("test_resnet", **{"in_chans": 1, "num_classes": 10, **kwargs})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


def test_invalid_teachers_are_reported_before_training(tmp_path):
    five = _checkpoint(tmp_path / "five.safetensors", num_classes=5)
    rgb = _checkpoint(tmp_path / "rgb.safetensors", in_chans=3)
    cfg = tiny_pipeline(tmp_path / "out")
    cfg["data"]["augment"] = True
    cfg["stages"] = [
        {"name": "dense", "train": {"epochs": 1}},
        {"distill": {"teacher": "resnt18"}},
        {"distill": {"teacher": "test_resnet", "teacher_kwargs": {"num_classes": 5},
                     "teacher_checkpoint": five}},
        {"distill": {"teacher": "stage:dense",
                     "features": [{"student": "layer9", "teacher": "layr3"}]}},
        {"distill": {"teacher": "stage:dense", "cache_teacher_logits": True}},
        {"distill": {"teacher": "missing/teacher.safetensors"}},
        {"distill": {"teacher": "test_resnet", "teacher_kwargs": {"in_chans": 3},
                     "teacher_checkpoint": rgb}},
        {"distill": {"teacher": "runs:/0123abcd/artifact"}},
        # last: stages after a student that cannot be built receive an unknown architecture
        {"distill": {"teacher": "stage:dense", "student": {"name": "test_efficentnet"}}},
    ]
    problems = _problems(cfg)
    assert "did you mean 'resnet18'" in problems["stages[1].distill.teacher"]
    assert "outputs 5 classes, the student 10" in problems["stages[2].distill.teacher"]
    assert "did you mean 'layer4'" in problems["stages[3].distill.features[0].student"]
    assert "did you mean 'layer3'" in problems["stages[3].distill.features[0].teacher"]
    assert "augmentation" in problems["stages[4].distill.cache_teacher_logits"]
    assert "teacher not found" in problems["stages[5].distill.teacher"]
    assert "cannot run on the data's 1x16x16" in problems["stages[6].distill.teacher"]
    assert "no MLflow store" in problems["stages[7].distill.teacher"]
    assert "did you mean 'test_efficientnet'" in problems["stages[8].distill.student.name"]
    assert len(problems) == 9
    assert not (tmp_path / "out").exists()  # validation wrote nothing

    cfg["data"]["augment"] = False
    cfg["stages"] = [{"distill": {"teacher": "stage:dense"}}, {"name": "dense", "train": {}}]
    with pytest.raises(ConfigError, match=r"stages\[0\]\.distill\.teacher: 'stage:dense' does "
                                          "not name an earlier stage"):
        compresspipe.load_pipeline(cfg)


def test_stage_teacher_features_follow_an_earlier_student(tmp_path):
    """stage:small is a test_efficientnet, so its layer names (not resnet's) are valid."""
    cfg = tiny_pipeline(tmp_path / "out")
    cfg["stages"] = [
        {"name": "small", "distill": {"teacher": _checkpoint(tmp_path / "t.safetensors"),
                                      "student": {"name": "test_efficientnet"}}},
        {"distill": {"teacher": "stage:small", "student": {"name": "test_resnet"},
                     "features": [{"student": "layer3", "teacher": "conv_head"}]}},
    ]
    compresspipe.load_pipeline(cfg)
    cfg["stages"][1]["distill"]["features"][0]["teacher"] = "layer3"
    with pytest.raises(ConfigError, match=r"features\[0\]\.teacher: the teacher has no module"):
        compresspipe.load_pipeline(cfg)


# -- what the hook measures: the teacher once, agreement at every evaluation ------------------


def _logged_fit(model, data, hook, epochs=2):
    logged: list[tuple[dict, int]] = []
    cfg = TrainConfig(epochs=epochs, lr=0.05, schedule="constant")
    history = Trainer(model, data, cfg, device=CPU, seed=0, hooks=[hook],
                      log=lambda metrics, step: logged.append((dict(metrics), step))).fit()
    return history, logged


def test_hook_logs_teacher_accuracy_once_and_agreement_per_evaluation(digits, capsys):
    teacher = _mlp(48, seed=1)
    _fit(teacher, digits, [], epochs=3)
    teacher_test = evaluate(teacher, digits.test_loader())
    student = _mlp(16, seed=0)
    start = evaluate(student, digits.test_loader())
    seen = []
    teacher.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    hook = DistillHook(teacher, DistillConfig(teacher="mlp48"), student, (1, 8, 8))
    history, logged = _logged_fit(student, digits, hook)
    # the teacher ran over the test set (the starting report) and the validation split (the
    # per-epoch evaluation) once each, then its predictions were reused
    assert sum(seen) == 2 * len(digits.train) + len(digits.test) + len(digits.val)

    first, step = logged[0]
    assert step == 0 and first == {
        "teacher_top1": teacher_test["top1"], "teacher_loss": pytest.approx(teacher_test["loss"]),
        "student_start_top1": start["top1"], "teacher_below_student": 0.0}
    assert [m for m, _ in logged[1:] if "teacher_top1" in m] == []  # once
    assert [step for m, step in logged if "agreement" in m] == [1, 2]
    # the loop's own predictions against the teacher's, as measured from scratch
    assert history[-1]["agreement"] == agreement(student, teacher, digits.val_loader())
    assert 0 < history[0]["agreement"] <= 100
    out = capsys.readouterr().out
    assert (f"distillation teacher mlp48: top-1 {teacher_test['top1']:.2f}% on the test set; "
            f"the student starts at {start['top1']:.2f}%") in out
    assert "WARNING" not in out


def test_hook_warns_when_the_teacher_is_worse_than_the_student(digits, capsys):
    student = _mlp(16, seed=0)
    _fit(student, digits, [], epochs=3)
    hook = DistillHook(_mlp(48, seed=1), DistillConfig(teacher="untrained"), student, (1, 8, 8))
    _, logged = _logged_fit(student, digits, hook, epochs=1)
    assert logged[0][0]["teacher_below_student"] == 1.0
    assert logged[0][0]["teacher_top1"] < logged[0][0]["student_start_top1"]
    assert "WARNING: the teacher" in capsys.readouterr().out


class Recorder(nn.Module):
    """Like a fake-quant observer: records every batch in its buffers, in any mode, and
    sizes one of them on first sight."""

    def __init__(self):
        super().__init__()
        self.register_buffer("images", torch.zeros(()))
        self.register_buffer("first_batch", torch.empty(0))

    def forward(self, x):
        self.images += len(x)
        if self.first_batch.numel() == 0:
            self.first_batch = torch.tensor([float(len(x))])
        return x


def test_measuring_the_student_at_the_start_leaves_no_trace(digits):
    recorder = Recorder()
    student = nn.Sequential(recorder, *_mlp(16, seed=0))
    hook = DistillHook(_mlp(48, seed=1), DistillConfig(teacher="x"), student, (1, 8, 8))
    _, logged = _logged_fit(student, digits, hook, epochs=1)
    assert "student_start_top1" in logged[0][0]  # measured, then the buffers put back:
    # only the loop's own passes (train, validation): the starting report's were put back
    assert recorder.images == len(digits.train) + len(digits.val)
    assert recorder.first_batch.tolist() == [64.0]  # a training batch, not a test batch


@pytest.fixture(scope="module")
def joint_prune(tmp_path_factory):
    """dense -> prune 90% with KD from stage:dense during its retraining."""
    out = tmp_path_factory.mktemp("joint") / "out"
    cfg = tiny_pipeline(out, epochs=2)
    cfg["stages"] = [
        cfg["stages"][0],
        {"name": "pruned", "prune": {"sparsity": 0.9, "train": {"epochs": 2, "lr": 0.02},
                                     "distill": {"teacher": "stage:dense"}}},
    ]
    summary = compresspipe.run(cfg)
    client = MlflowClient(summary["tracking_uri"])
    return out, summary, client, summary["stage_runs"]["pruned"]


def test_kd_inside_prune_keeps_the_mask(joint_prune):
    out, summary, client, run_id = joint_prune
    art = compresspipe.load(out / "pruned")
    params = dict(art.model.named_parameters())
    pruned = sum(int((~m).sum()) for m in art.masks.values())
    assert pruned >= 0.89 * sum(m.numel() for m in art.masks.values())
    for name, mask in art.masks.items():  # exactly zero after retraining against the teacher
        assert torch.count_nonzero(params[name].detach()[~mask]) == 0, name
    kd = client.get_metric_history(run_id, "train_kd")
    assert [m.step for m in kd] == [1, 2] and all(m.value > 0 for m in kd)  # the hook ran


def test_joint_kd_logs_teacher_and_agreement(joint_prune):
    out, summary, client, run_id = joint_prune
    dense = next(r for r in summary["stages"] if r["name"] == "dense")["metrics"]
    teacher = client.get_metric_history(run_id, "teacher_top1")
    # the teacher is the dense stage's file, which the runner measured
    assert [(m.step, m.value) for m in teacher] == [(0, pytest.approx(dense["test_top1"]))]
    agreed = client.get_metric_history(run_id, "agreement")
    assert [m.step for m in agreed] == [1, 2] and all(0 < m.value <= 100 for m in agreed)
    assert [m.step for m in client.get_metric_history(run_id, "student_start_top1")] == [0]


# -- teachers that cannot teach -----------------------------------------------------------------


def test_untrained_timm_teachers_are_rejected(tmp_path):
    cfg = tiny_pipeline(tmp_path / "out")
    cfg["stages"] = [
        {"name": "dense", "train": {"epochs": 1}},
        {"distill": {"teacher": "resnet18"}},
        {"prune": {"distill": {"teacher": "test_resnet"}}},
        {"distill": {"teacher": "resnet18", "teacher_kwargs": {"pretrained": True}}},
        {"distill": {"teacher": "test_resnet", "teacher_checkpoint": _checkpoint(
            tmp_path / "t.safetensors")}},
    ]
    problems = _problems(cfg)
    assert "'resnet18' would have random weights" in problems["stages[1].distill.teacher"]
    assert "teacher_checkpoint" in problems["stages[1].distill.teacher"]
    assert "would have random weights" in problems["stages[2].prune.distill.teacher"]
    # the hub's 1000-class head does not fit digits: timm would re-initialise it
    assert "predicts 1000 classes and the data 10" in problems["stages[3].distill.teacher"]
    assert set(problems) == {"stages[1].distill.teacher", "stages[2].prune.distill.teacher",
                             "stages[3].distill.teacher"}  # trained weights are fine


def test_input_model_as_teacher_has_the_input_architecture(tmp_path):
    """'stage:input' names the pipeline's model as it starts (the runner saves it as
    output_dir/input), not the student a later distill stage switches to."""
    cfg = tiny_pipeline(tmp_path / "out")
    cfg["stages"] = [{"name": "dense", "train": {"epochs": 1}},
                     {"name": "small", "distill": {"teacher": "stage:dense",
                                                   "student": {"name": "test_efficientnet"}}}]
    pipeline = compresspipe.load_pipeline(cfg)
    config = pipeline.config
    view = PipelineView(config.model, config.data, config.tracking, config.resolved_output_dir(),
                        pipeline.stages)
    assert stage_architecture(view, "input")["name"] == "test_resnet"
    student = build_from_spec(stage_architecture(view, "small"))
    features = [{"student": "conv_head", "teacher": "layer3"}]
    assert check_distill(DistillConfig(teacher="stage:input", features=features), student,
                         view) == []


def test_registered_model_version_as_teacher(tmp_path):
    """models:/NAME/VERSION resolves in the pipeline's tracking store; a logged model with
    neither a model nor an artifact in it is rejected (registered stage models:
    test_tracking_models.py)."""
    from compresspipe.compress.distill.teacher import TeacherError
    from compresspipe.core.artifact import Artifact

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = compresspipe.load_pipeline(tiny_pipeline(tmp_path / "out", tracking={"uri": store}),
                                        check_model=False).config
    model = build_from_spec(stage_architecture(config, "input"))
    Artifact(model=model, spec=stage_architecture(config, "input")).save(tmp_path / "art")
    client = MlflowClient(store)
    experiment = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(tmp_path / "art"), "artifact")
    client.create_registered_model("teacher")
    client.create_model_version("teacher", f"runs:/{run_id}/artifact", run_id=run_id)
    client.set_registered_model_alias("teacher", "best", "1")

    for uri in ("models:/teacher/1", "models:/teacher@best"):
        teacher = load_teacher(DistillConfig(teacher=uri), config)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in teacher.state_dict().items())
    logged = client.create_logged_model(experiment, name="empty", source_run_id=run_id)
    with pytest.raises(TeacherError, match="cannot download teacher .models:/m-"):
        load_teacher(DistillConfig(teacher=f"models:/{logged.model_id}"), config)
    with pytest.raises(TeacherError, match="expected models:/NAME/VERSION"):
        load_teacher(DistillConfig(teacher="models:/teacher/latest"), config)
