"""Knowledge distillation: the KD losses, where a teacher comes from, and the training hook.

``distill_hook(cfg, ctx, student)`` is what every stage that trains uses for (joint)
distillation: it adds Hinton's soft-target term and one feature term per configured layer pair to
the one training loop, and lowers the hard-label weight to ``gamma``:

    L = gamma * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
        + sum_i weight_i * MSE(adapter_i(f_s_i), f_t_i)

The teacher is frozen, in eval mode and runs without gradients; the student is left alone apart
from forward hooks that read its feature maps, so pruning masks and fake-quant modules survive.

A teacher is named by one string: ``stage:NAME`` (an earlier stage's output; ``stage:input``
is the pipeline's model as it starts), a timm model name with trained weights
(``teacher_checkpoint``, or ``teacher_kwargs: {pretrained: true}`` where the hub's head fits the
dataset), an artifact directory, a checkpoint file (weights for the pipeline's own
architecture), an MLflow artifact URI (``runs:/<id>/artifact``) or a registered model version
whose source is such an artifact (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``).

Besides its loss terms the hook measures the teacher: its test accuracy is printed and logged
when training starts (with a warning when the student already does better), and every
evaluation of the loop logs the student's ``agreement`` (top-1 match) with it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...core import distributed as dist
from ...core.errors import CompressPipeError
from ...core.measure import evaluate
from ...core.training import TrainHook

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from ...core.config import DataConfig
    from ...pipeline.schema import PipelineConfig
    from ...stages.context import StageContext
    from .config import DistillConfig

TeacherKind = Literal["stage", "uri", "path", "timm"]
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
PROBE_BATCH = 2  # BatchNorm in train mode needs more than one value per channel

# MLflow downloads, so that validation and the run fetch a remote teacher only once per process
_DOWNLOADED: dict[tuple[str, str], Path] = {}


class TeacherError(CompressPipeError):
    """A teacher reference that cannot be resolved; ``key`` is the config field to blame."""

    def __init__(self, message: str, key: str = "teacher"):
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------------------------------
# Losses


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(z_t/T) || softmax(z_s/T)), summed over classes, mean over the batch.

    The T^2 factor keeps the soft-target gradients on the scale of the hard-label ones
    (Hinton et al. 2015)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return t * t * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """MSE between an adapted student feature and the teacher's; feature maps of different
    spatial size are average-pooled to the smaller one."""
    if student_feat.dim() == 4 and student_feat.shape[-2:] != teacher_feat.shape[-2:]:
        size = (min(student_feat.shape[-2], teacher_feat.shape[-2]),
                min(student_feat.shape[-1], teacher_feat.shape[-1]))
        student_feat = F.adaptive_avg_pool2d(student_feat, size)
        teacher_feat = F.adaptive_avg_pool2d(teacher_feat, size)
    return F.mse_loss(student_feat.float(), teacher_feat.float())


class FeatureAdapter(nn.Module):
    """Learned map from a student feature to the teacher's width: a 1x1 convolution for
    (N, C, H, W) maps, a linear layer for (N, L, C) tokens and (N, C) vectors."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]):
        super().__init__()
        problem = feature_mismatch(student_shape, teacher_shape)
        if problem:
            raise CompressPipeError(problem)
        if len(student_shape) == 4:
            self.proj: nn.Module = nn.Conv2d(student_shape[1], teacher_shape[1], 1)
        else:
            self.proj = nn.Linear(student_shape[-1], teacher_shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def feature_mismatch(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> str | None:
    """Why two feature shapes cannot be matched by an adapter, or None if they can."""
    s, t = tuple(student_shape), tuple(teacher_shape)
    if len(s) != len(t) or len(s) not in (2, 3, 4):
        return (f"student feature of shape {list(s[1:])} cannot be mapped onto teacher feature of "
                f"shape {list(t[1:])} (both must be (C, H, W) maps, (L, C) tokens or (C,) vectors)")
    if len(s) == 3 and s[1] != t[1]:
        return f"student has {s[1]} tokens, teacher {t[1]}; token features need equal counts"
    return None


# ---------------------------------------------------------------------------------------------
# Features and probing


@contextlib.contextmanager
def capture_features(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that store the output of each named module in the yielded dict."""
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(_store_hook(store, n)) for n in names]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _store_hook(store: dict[str, torch.Tensor], name: str) -> Callable:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, (tuple, list)):  # e.g. attention blocks returning (x, weights)
            output = output[0]
        if not isinstance(output, torch.Tensor):
            raise CompressPipeError(f"module {name!r} returns {type(output).__name__}, "
                                    "not a tensor; pick another layer for feature distillation")
        store[name] = output

    return hook


@torch.no_grad()
def probe(model: nn.Module, input_shape: tuple[int, int, int],
          names: list[str] = ()) -> tuple[torch.Tensor, dict[str, tuple[int, ...]]]:
    """Run one all-zero batch; return the output and the shapes of the named modules' outputs.

    Runs the model as it is (no train/eval switch); callers pass an eval-mode model or a copy."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.zeros(PROBE_BATCH, *input_shape, device=device)
    with capture_features(model, list(names)) as feats:
        out = model(x)
    return out, {n: tuple(f.shape) for n, f in feats.items()}


def module_problem(model: nn.Module, name: str, who: str) -> str | None:
    """'student has no module ...' with a close match, or None if ``name`` exists."""
    from ...core.errors import suggest

    names = [n for n, _ in model.named_modules() if n]
    if name in names:
        return None
    top = sorted({n.split(".")[0] for n in names})
    hint = suggest(name, names) or f" (top-level modules: {', '.join(top[:12])})"
    return f"the {who} has no module {name!r}{hint}"


# ---------------------------------------------------------------------------------------------
# The teacher-logit cache


class TeacherLogitCache:
    """Teacher logits computed once per training image and reused in later epochs.

    Keyed by the bytes of the input image, since the loop hands hooks images, not indices: a
    shuffled loader then finds each image's logits in any order, and identical images share
    them. Only valid when inputs do not change between epochs (no augmentation). Logits are kept
    on the CPU: images x classes x 4 bytes."""

    def __init__(self) -> None:
        self.logits: dict[bytes, torch.Tensor] = {}
        self.misses = 0

    def __len__(self) -> int:
        return len(self.logits)

    def lookup(self, inputs: torch.Tensor,
               compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Logits for ``inputs``; ``compute`` runs only on images not seen before."""
        flat = inputs.detach().to("cpu", torch.float32).contiguous().view(len(inputs), -1).numpy()
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]
        missing = [i for i, k in enumerate(keys) if k not in self.logits]
        if missing:
            fresh = compute(inputs[missing]).detach().float().cpu()
            for i, row in zip(missing, fresh):
                self.logits[keys[i]] = row
            self.misses += len(missing)
        return torch.stack([self.logits[k] for k in keys]).to(inputs.device)


# ---------------------------------------------------------------------------------------------
# The hook


class DistillHook(TrainHook):
    """KD (+ feature) loss terms for the one training loop; see the module docstring.

    Loss terms are logged per epoch as ``train_kd``, ``train_ce`` (already weighted by gamma)
    and ``train_feat_<student layer>``; ``teacher_top1``, ``teacher_loss``,
    ``student_start_top1`` and ``teacher_below_student`` once when training starts, and
    ``agreement`` at every evaluation. The teacher's test-set predictions are computed once
    (it is frozen and test images are not augmented)."""

    def __init__(self, teacher: nn.Module, cfg: DistillConfig, student: nn.Module,
                 input_shape: tuple[int, int, int]):
        self.cfg = cfg
        self.ce_weight = cfg.gamma
        self.teacher = freeze(teacher)
        self.cache = TeacherLogitCache() if cfg.cache_teacher_logits else None
        if self.cache is not None and cfg.features:
            raise CompressPipeError("cache_teacher_logits caches logits only; feature "
                                    "distillation needs the teacher's forward pass at every step")
        for i, pair in enumerate(cfg.features):
            for model, name, who in ((student, pair.student, "student"),
                                     (teacher, pair.teacher, "teacher")):
                if (problem := module_problem(model, name, who)) is not None:
                    raise CompressPipeError(f"features[{i}].{who}: {problem}")
        self.adapters = nn.ModuleDict(self._adapters(student, input_shape))
        self._student_handles: list[Any] = []
        self._student_feats: dict[str, torch.Tensor] = {}
        self._teacher_feats: dict[str, torch.Tensor] = {}
        self._teacher_handles = [
            dict(teacher.named_modules())[n].register_forward_hook(_store_hook(self._teacher_feats, n))
            for n in {p.teacher for p in cfg.features}
        ]
        self._epochs = 0
        # per test loader (the whole set, or this process's shard): teacher metrics, top-1s
        self._reference: dict[tuple, tuple[dict[str, float], torch.Tensor]] = {}

    def _adapters(self, student: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, nn.Module]:
        if not self.cfg.features:
            return {}
        # a copy, so that probing leaves no trace in the student (BN statistics, observers)
        s_out, s_shapes = probe(copy.deepcopy(student), input_shape,
                                [p.student for p in self.cfg.features])
        t_out, t_shapes = probe(self.teacher, input_shape, [p.teacher for p in self.cfg.features])
        if s_out.shape[1:] != t_out.shape[1:]:
            raise CompressPipeError(f"teacher outputs {list(t_out.shape[1:])}, student "
                                    f"{list(s_out.shape[1:])}; they must predict the same classes")
        adapters = {}
        for i, pair in enumerate(self.cfg.features):
            try:
                adapters[_adapter_key(pair.student)] = FeatureAdapter(s_shapes[pair.student],
                                                                      t_shapes[pair.teacher])
            except CompressPipeError as exc:
                raise CompressPipeError(f"features[{i}] ({pair.student} -> {pair.teacher}): "
                                        f"{exc}") from None
        return adapters

    def modules(self) -> dict[str, nn.Module]:
        return {f"distill_{k}": m for k, m in self.adapters.items()}

    def on_train_start(self, trainer: Any) -> None:
        self._epochs = trainer.cfg.epochs
        self.teacher.to(trainer.device)
        if trainer.start_epoch < self._epochs:
            self._report_start(trainer)
        if self.cfg.features and not self._student_handles and trainer.start_epoch < self._epochs:
            modules = dict(trainer.model.named_modules())
            for i, name in enumerate(dict.fromkeys(p.student for p in self.cfg.features)):
                if name not in modules:
                    raise CompressPipeError(f"features[{i}].student: the model being trained has "
                                            f"no module {name!r}")
                self._student_handles.append(
                    modules[name].register_forward_hook(_store_hook(self._student_feats, name)))

    def extra_loss(self, model: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor,
                   targets: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_logits = self.teacher_logits(inputs)
        if teacher_logits.shape != outputs.shape:
            raise CompressPipeError(f"teacher logits {list(teacher_logits.shape)} do not match "
                                    f"student logits {list(outputs.shape)}")
        terms = {"kd": self.cfg.alpha * kd_loss(outputs, teacher_logits, self.cfg.temperature)}
        for pair in self.cfg.features:
            if pair.student not in self._student_feats:
                raise CompressPipeError(f"feature distillation: student module {pair.student!r} "
                                        "was not called in the forward pass")
            adapted = self.adapters[_adapter_key(pair.student)](self._student_feats[pair.student])
            terms[f"feat_{pair.student}"] = pair.weight * feature_loss(
                adapted, self._teacher_feats[pair.teacher])
        self._student_feats.clear()
        self._teacher_feats.clear()
        return terms

    def _report_start(self, trainer: Any) -> None:
        """Print and log the teacher's test accuracy before the first step, with the student's
        when training starts from scratch; warn if the student is already the better one."""
        loader = trainer.data.test_loader()
        teacher, _ = self.reference(loader)
        metrics = {"teacher_top1": teacher["top1"], "teacher_loss": teacher["loss"]}
        line = (f"[{trainer.desc}] distillation teacher {self.cfg.teacher}: top-1 "
                f"{teacher['top1']:.2f}% on the test set")
        below = False
        if trainer.start_epoch == 0:
            student = _evaluate_untouched(trainer.model, loader, trainer.device)
            below = teacher["top1"] < student["top1"]
            metrics.update(student_start_top1=student["top1"], teacher_below_student=float(below))
            line += f"; the student starts at {student['top1']:.2f}%"
        if not dist.is_main():
            return
        print(line, flush=True)
        if below:
            print(f"[{trainer.desc}] WARNING: the teacher ({teacher['top1']:.2f}%) is less "
                  f"accurate than the student it teaches ({metrics['student_start_top1']:.2f}%): "
                  "distillation pulls the student towards its mistakes; check the teacher "
                  "(its weights, its classes) or lower alpha", flush=True)
        trainer.log(metrics, trainer.start_epoch)

    def reference(self, loader: DataLoader) -> tuple[dict[str, float], torch.Tensor]:
        """The teacher's test metrics and top-1 classes on ``loader`` (in its order), computed
        on the first call per loader."""
        key = _loader_key(loader)
        if key not in self._reference:
            device = next((p.device for p in self.teacher.parameters()), torch.device("cpu"))
            predictions: list[torch.Tensor] = []
            metrics = evaluate(self.teacher, loader, device, predictions)
            self._teacher_feats.clear()  # filled by the feature hooks; not a training step
            self._reference[key] = metrics, torch.cat(predictions)
        return self._reference[key]

    def on_evaluate(self, loader: DataLoader, predictions: torch.Tensor) -> dict[str, float]:
        # the student's features from the loop's evaluation pass are no training step's
        self._student_feats.clear()
        return {"agreement": agreement(predictions, self.reference(loader)[1], loader)}

    @torch.no_grad()
    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits for ``inputs`` (from the cache when enabled)."""
        if self.cache is not None:
            return self.cache.lookup(inputs, self.teacher)
        return self.teacher(inputs)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if epoch + 1 >= self._epochs:
            self.close()

    def close(self) -> None:
        """Remove the student's feature hooks (idempotent); the student is then untouched."""
        for h in self._student_handles:
            h.remove()
        self._student_handles.clear()
        self._student_feats.clear()


def _evaluate_untouched(model: nn.Module, loader: DataLoader,
                        device: torch.device | str) -> dict[str, float]:
    """``evaluate`` that leaves no trace in ``model``: fake-quant observers record what they
    see even in eval mode, so every buffer is put back as it was. Neither a deep copy (a copy
    of a captured QAT graph does not evaluate as the graph does) nor load_state_dict (the
    observers' loader resets their eps)."""
    saved = [(module, name, buf.detach().clone()) for module in model.modules()
             for name, buf in module.named_buffers(recurse=False)]
    try:
        return evaluate(model, loader, device)
    finally:
        with torch.no_grad():
            for module, name, value in saved:
                current = getattr(module, name)
                if current.shape == value.shape and current.dtype == value.dtype:
                    current.copy_(value)
                else:  # an observer resized its statistics on first sight
                    setattr(module, name, value)


def _loader_key(loader: DataLoader) -> tuple:
    """Which test images ``loader`` yields: its dataset, and the indices of a shard."""
    from torch.utils.data import Subset

    data = loader.dataset
    if isinstance(data, Subset):
        return id(data.dataset), tuple(data.indices)
    return id(data), None


def _adapter_key(layer: str) -> str:
    return "feat_" + layer.replace(".", "_")  # ModuleDict keys may not contain dots


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no gradients: a teacher is never trained."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def distill_hook(cfg: DistillConfig, ctx: StageContext, student: nn.Module) -> DistillHook:
    """The distillation hook for ``student``, with the teacher ``cfg`` names resolved in ``ctx``.

    Pass it to ``ctx.trainer(..., hooks=[hook], masks=artifact.masks)``; call ``hook.close()``
    if the student is used after a training that did not run to its last epoch."""
    teacher = resolve_teacher(cfg, ctx).to(ctx.device)
    shape = (ctx.data.in_chans, ctx.data.image_size, ctx.data.image_size)
    return DistillHook(teacher, cfg, student, shape)


# ---------------------------------------------------------------------------------------------
# Teachers


def teacher_kind(ref: str) -> TeacherKind:
    """How a teacher string is read: stage reference, MLflow URI, filesystem path or timm name."""
    if ref.startswith("stage:"):
        return "stage"
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", ref):  # runs:/, models:/, s3://, ...
        return "uri"
    if "/" in ref or os.sep in ref or Path(ref).suffix in CHECKPOINT_SUFFIXES:
        return "path"
    import timm

    return "path" if Path(ref).exists() and not timm.is_model(ref) else "timm"


def resolve_teacher(cfg: DistillConfig, ctx: StageContext) -> nn.Module:
    """The teacher network ``cfg.teacher`` names, with its weights, frozen in eval mode."""
    return freeze(load_teacher(cfg, ctx.pipeline.config, ctx.load_stage))


def load_teacher(cfg: DistillConfig, pipeline: PipelineConfig,
                 load_stage: Callable[[str], Any] | None = None) -> nn.Module:
    """Build the teacher. Without ``load_stage`` (validation, before anything ran), a stage
    teacher is its architecture without weights and hub weights are not downloaded."""
    kind = teacher_kind(cfg.teacher)
    if kind != "timm":
        for key in ("teacher_checkpoint", "teacher_kwargs"):
            if getattr(cfg, key):
                raise TeacherError(f"{key} applies to a timm-name teacher, not to {cfg.teacher!r}",
                                   key)
    if kind == "stage":
        name = cfg.teacher.removeprefix("stage:")
        if load_stage is not None:
            # the stage's fp32 weights, even where the stage also wrote a deployable form
            return load_stage(name).model
        from ...core.models import build_from_spec

        return build_from_spec(stage_architecture(pipeline, name))
    if kind == "timm":
        return _timm_teacher(cfg, pipeline.data, download=load_stage is not None)
    if kind == "uri":
        return _artifact_model(_download(cfg.teacher, pipeline), cfg.teacher)
    return _path_teacher(Path(cfg.teacher), pipeline)


def _timm_teacher(cfg: DistillConfig, data: DataConfig, download: bool) -> nn.Module:
    import timm

    from ...core.config import ModelConfig
    from ...core.errors import suggest
    from ...core.models import build_from_spec, load_weights, model_spec, read_checkpoint

    if not timm.is_model(cfg.teacher):
        raise TeacherError(
            f"unknown timm model {cfg.teacher!r}{suggest(cfg.teacher, timm.list_models())} (a "
            "teacher is 'stage:NAME', a timm model name, an artifact directory, a checkpoint file "
            "or an MLflow URI such as runs:/<run_id>/artifact)")
    kwargs = dict(cfg.teacher_kwargs)
    pretrained = bool(kwargs.pop("pretrained", False))
    spec = model_spec(ModelConfig(name=cfg.teacher, kwargs=kwargs), data)
    try:
        model = build_from_spec(spec, pretrained=pretrained and download)
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError) as exc:
        raise TeacherError(f"cannot build timm model {cfg.teacher!r} with {spec['kwargs']}: "
                           f"{type(exc).__name__}: {exc}", "teacher_kwargs") from None
    if cfg.teacher_checkpoint is None:
        if (problem := untrained_teacher(cfg.teacher, pretrained, spec["kwargs"])) is not None:
            raise TeacherError(problem)
    else:
        if not cfg.teacher_checkpoint.is_file():
            raise TeacherError(f"file not found: {cfg.teacher_checkpoint}", "teacher_checkpoint")
        try:
            load_weights(model, read_checkpoint(cfg.teacher_checkpoint), str(cfg.teacher_checkpoint))
        except CompressPipeError as exc:
            raise TeacherError(str(exc), "teacher_checkpoint") from None
    return model


def untrained_teacher(name: str, pretrained: bool, kwargs: dict[str, Any]) -> str | None:
    """Why timm model ``name`` built with ``kwargs`` (no checkpoint) would teach from random
    weights, or None. Read from timm's pretrained config: nothing is downloaded."""
    from timm.models import get_pretrained_cfg

    hint = ("give its trained weights as teacher_checkpoint, or name a trained model "
            "('stage:NAME', an artifact directory, a checkpoint file, runs:/<run_id>/artifact)")
    if not pretrained:
        return (f"teacher {name!r} would have random weights: {hint}, or set teacher_kwargs: "
                "{pretrained: true} for the hub's weights")
    try:
        hub = get_pretrained_cfg(name)
    except (RuntimeError, ValueError, KeyError):
        hub = None
    if hub is None or not hub.has_weights:
        return f"timm has no pretrained weights for {name!r}: {hint}"
    classes = kwargs.get("num_classes", hub.num_classes)
    if hub.num_classes and classes != hub.num_classes:
        return (f"the pretrained {name!r} predicts {hub.num_classes} classes and the data "
                f"{classes}: timm would replace its classifier by a random one; {hint} (e.g. "
                "fine-tune it on this dataset in a pipeline of its own)")
    return None


def _path_teacher(path: Path, pipeline: PipelineConfig) -> nn.Module:
    """An artifact directory, or a checkpoint holding weights of the pipeline's architecture."""
    from ...core.models import build_from_spec, load_weights, model_spec, read_checkpoint

    if path.is_dir():
        return _artifact_model(path, str(path))
    if not path.is_file():
        raise TeacherError(f"teacher not found: no file or directory {str(path)!r}")
    model = build_from_spec(model_spec(pipeline.model, pipeline.data))
    try:
        load_weights(model, read_checkpoint(path), str(path))
    except CompressPipeError as exc:
        raise TeacherError(f"{exc} (a checkpoint teacher holds weights for the pipeline's model; "
                           "for another architecture give its timm name as the teacher and this "
                           "file as teacher_checkpoint)") from None
    return model


def _artifact_model(directory: Path, ref: str) -> nn.Module:
    from ...core.artifact import Artifact

    try:
        return Artifact.load(directory).model
    except CompressPipeError as exc:
        raise TeacherError(f"teacher {ref!r} is not a compresspipe artifact: {exc}") from None


def _download(uri: str, pipeline: PipelineConfig) -> Path:
    """An MLflow artifact URI fetched to a local directory, using the pipeline's tracking URI."""
    from ...tracking.tracker import tracking_uri

    store = tracking_uri(pipeline.tracking, pipeline.resolved_output_dir())
    key = (uri, store)
    local_db = Path(store.removeprefix("sqlite:///")) if store.startswith("sqlite:///") else None
    if local_db is not None and not local_db.is_file():
        # asking mlflow would create an empty database there
        raise TeacherError(f"cannot download teacher {uri!r}: no MLflow store at {local_db} (set "
                           "tracking.uri or MLFLOW_TRACKING_URI to the store that holds the run)")
    if key not in _DOWNLOADED:
        import mlflow.artifacts

        try:
            source = _registered_source(uri, store) if uri.startswith("models:/") else uri
            _DOWNLOADED[key] = Path(mlflow.artifacts.download_artifacts(artifact_uri=source,
                                                                        tracking_uri=store))
        except TeacherError:
            raise
        except Exception as exc:  # mlflow raises many types for a bad URI, run or server
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TeacherError(f"cannot download teacher {uri!r} from tracking store {store}: "
                               f"{first}") from None
    return _DOWNLOADED[key]


def _registered_source(uri: str, store: str) -> str:
    """Where the registered model version ``models:/NAME/VERSION`` (or ``@ALIAS``) of the
    tracking store ``store`` keeps its files. mlflow resolves a models:/ URI in the process's
    registry, not in the store passed to download_artifacts: hence this lookup."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    ref = uri.removeprefix("models:/").strip("/")
    name, _, version = ref.partition("/")
    if not version and "@" in name:
        name, alias = name.split("@", 1)
        found = client.get_model_version_by_alias(name, alias)
    elif version.isdigit():
        found = client.get_model_version(name, version)
    elif not version and ref.startswith("m-"):  # a logged model's id, as the export stage logs
        raise TeacherError(_mlflow_model(uri, client.get_logged_model(ref).source_run_id))
    else:
        raise TeacherError(f"teacher {uri!r}: expected models:/NAME/VERSION or "
                           "models:/NAME@ALIAS (a registered model version)")
    if getattr(found, "model_id", None):  # a version of a logged MLflow model
        raise TeacherError(_mlflow_model(uri, found.run_id))
    return found.source


def _mlflow_model(uri: str, run_id: str | None) -> str:
    where = (f"the compresspipe artifact of the run that logged it: teacher: runs:/{run_id}/"
             "artifact" if run_id else "a compresspipe artifact, e.g. runs:/<run_id>/artifact")
    return (f"teacher {uri!r} is an MLflow model (e.g. the export stage's ONNX file), which "
            f"compresspipe cannot train against; name {where}")


def stage_architecture(pipeline: PipelineConfig, name: str) -> dict[str, Any]:
    """The model spec an earlier stage's output has, as far as the file tells: the pipeline's
    model, or the last ``student`` a distill stage up to ``name`` switched to ('input': the
    pipeline's model)."""
    from ...core.config import ModelConfig
    from ...core.models import model_spec
    from ...pipeline.loader import _stage_specs
    from ...pipeline.runner import INPUT_STAGE

    spec = model_spec(pipeline.model, pipeline.data)
    if name == INPUT_STAGE:  # the pipeline's model as it starts, saved before any stage
        return spec
    for stage in _stage_specs(pipeline):
        student = getattr(stage.config, "student", None)
        if stage.type == "distill" and isinstance(student, ModelConfig):
            spec = model_spec(student, pipeline.data)
        if stage.name == name:
            break
    return spec


# ---------------------------------------------------------------------------------------------
# Validation


def check_distill(cfg: DistillConfig | None, student_model: nn.Module, pipeline: PipelineConfig,
                  prefix: str = "") -> list[tuple[str, str]]:
    """Problems of a distillation config against the real student, as (path, message) pairs
    with paths under ``prefix`` (e.g. 'distill' inside a prune stage's config); none for an
    absent (None) config, so stages with an optional ``distill:`` block just call this."""
    if cfg is None:
        return []

    def at(key: str) -> str:
        return f"{prefix}.{key}" if prefix else key

    problems: list[tuple[str, str]] = []
    if cfg.cache_teacher_logits and pipeline.data.augment:
        problems.append((at("cache_teacher_logits"), "cached teacher logits are only valid "
                         "without augmentation (data.augment is true): an augmented image "
                         "differs every epoch"))
    if cfg.cache_teacher_logits and cfg.features:
        problems.append((at("cache_teacher_logits"), "cannot cache with feature distillation: "
                         "the teacher's features are needed at every step"))
    try:
        teacher = freeze(load_teacher(cfg, pipeline))
    except TeacherError as exc:
        return [*problems, (at(exc.key), str(exc))]

    seen: set[str] = set()
    for i, pair in enumerate(cfg.features):
        for model, name, who in ((student_model, pair.student, "student"),
                                 (teacher, pair.teacher, "teacher")):
            if (problem := module_problem(model, name, who)) is not None:
                problems.append((at(f"features[{i}].{who}"), problem))
        if pair.student in seen:
            problems.append((at(f"features[{i}].student"),
                             f"student layer {pair.student!r} is listed twice"))
        seen.add(pair.student)
    if problems:
        return problems
    return _shape_problems(cfg, student_model, teacher, pipeline.data, at)


def _shape_problems(cfg: DistillConfig, student: nn.Module, teacher: nn.Module, data: DataConfig,
                    at: Callable[[str], str]) -> list[tuple[str, str]]:
    """Teacher and student must take the data's input and predict the same classes; feature
    pairs must be adaptable."""
    shape = (data.dataset_channels(), data.image_size, data.image_size)
    where = f"{shape[0]}x{shape[1]}x{shape[2]} images"
    try:
        t_out, t_shapes = probe(teacher, shape, [p.teacher for p in cfg.features])
    except Exception as exc:  # any failure of a foreign forward pass means it does not fit
        return [(at("teacher"), f"teacher {cfg.teacher!r} cannot run on the data's {where}: "
                 f"{type(exc).__name__}: {_first_line(exc)}")]
    was_training = student.training
    student.eval()
    try:
        s_out, s_shapes = probe(student, shape, [p.student for p in cfg.features])
    except Exception as exc:
        return [(at("teacher"), f"the student cannot run on the data's {where} "
                 f"({type(exc).__name__}: {_first_line(exc)})")]
    finally:
        student.train(was_training)
    if t_out.dim() != 2 or t_out.shape[1:] != s_out.shape[1:]:
        return [(at("teacher"), f"teacher {cfg.teacher!r} outputs {_classes(t_out)}, the student "
                 f"{_classes(s_out)}; set the teacher's num_classes or pick a teacher trained on "
                 "this dataset")]
    problems = []
    for i, pair in enumerate(cfg.features):
        if (problem := feature_mismatch(s_shapes[pair.student], t_shapes[pair.teacher])):
            problems.append((at(f"features[{i}]"), problem))
    return problems


def _classes(logits: torch.Tensor) -> str:
    if logits.dim() == 2:
        return f"{logits.shape[1]} classes"
    return f"a tensor of shape {list(logits.shape[1:])} per image"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# ---------------------------------------------------------------------------------------------
# Measuring


def agreement(student: nn.Module | torch.Tensor, teacher: nn.Module | torch.Tensor,
              loader: DataLoader, device: torch.device | str = "cpu") -> float:
    """Percentage of ``loader``'s images on which student and teacher predict the same top-1
    class. Either may be given as its top-1 classes on ``loader`` (see ``evaluate``'s
    ``predictions``), which spares a pass."""
    s, t = (_top1(m, loader, device) for m in (student, teacher))
    if len(s) != len(t):
        raise ValueError(f"{len(s)} student predictions but {len(t)} teacher predictions")
    if len(s) == 0:
        raise ValueError("evaluation set is empty")
    return 100.0 * (s == t).sum().item() / len(s)


def _top1(model: nn.Module | torch.Tensor, loader: DataLoader,
          device: torch.device | str) -> torch.Tensor:
    if isinstance(model, torch.Tensor):
        return model.cpu()
    predictions: list[torch.Tensor] = []
    evaluate(model, loader, device, predictions)
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
