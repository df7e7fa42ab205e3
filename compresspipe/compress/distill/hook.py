"""The distillation hook for the one training loop, and how a student is measured against its
teacher.

``DistillHook`` adds the soft-target and feature terms of ``losses`` to the loop and lowers the
hard-label weight to ``gamma``:

    L = gamma * CE(z_s, y) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
        + sum_i weight_i * MSE(adapter_i(f_s_i), f_t_i)

The teacher is frozen, in eval mode and runs without gradients; the student is left alone apart
from forward hooks that read its feature maps, so pruning masks and fake-quant modules survive.

Besides its loss terms the hook measures the teacher: its test accuracy is printed and logged
when training starts (with a warning when the student already does better), and every
evaluation of the loop logs the student's ``agreement`` (top-1 match) with it.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ...core import distributed as dist
from ...core.errors import CompressPipeError
from ...core.measure import evaluate
from ...core.training import TrainHook
from .losses import FeatureAdapter, feature_loss, kd_loss, module_problem, probe, store_hook

if TYPE_CHECKING:
    from .config import DistillConfig


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
            dict(teacher.named_modules())[n].register_forward_hook(store_hook(self._teacher_feats, n))
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
                    modules[name].register_forward_hook(store_hook(self._student_feats, name)))

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
