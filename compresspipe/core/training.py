"""The one training loop. Stages extend it with hooks; they never copy it.

Hooks add loss terms (distillation), act after each optimizer step (mask enforcement) or replace
the LR schedule (rewinding, ALLR). Each epoch ends with an atomic checkpoint of everything needed
to continue bit-exactly: weights, optimizer state, history and the hooks' trainable modules.
Randomness (shuffling, augmentation, dropout) is reseeded from (seed, epoch) at every epoch start,
so a resumed run sees exactly the batches an uninterrupted one would have.

Under torchrun the model is wrapped in DistributedDataParallel for the forward pass and each
process trains on its shard of every epoch; hooks still get the underlying module (parameter
names without "module."). At the start of ``fit`` every rank takes rank 0's weights, hook
modules and pruning masks; the gradients of the hooks' modules are averaged by hand; epoch
metrics and the (sharded) evaluation are reduced over all ranks; only rank 0 logs and writes
checkpoints, and a resume reads rank 0's checkpoint on every rank.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load, load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import distributed as dist
from .config import TrainConfig
from .data import DataBundle
from .errors import CompressPipeError
from .measure import evaluate

LrFn = Callable[[int, int], float]  # (step, total_steps) -> learning rate
CHECKPOINT_FILE = "checkpoint.safetensors"


class TrainHook:
    """Override what you need; every method has a do-nothing default."""

    # Weight of the task loss ("ce"); distillation lowers it to its gamma. Weights of several
    # hooks multiply.
    ce_weight: float = 1.0

    def modules(self) -> dict[str, nn.Module]:
        """Extra trainable modules (e.g. adapters); optimised and checkpointed with the model."""
        return {}

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors every rank must hold rank 0's copy of under torchrun (pruning masks scored
        on rank-local data differ); broadcast in place before training starts."""
        return {}

    def extra_loss(self, model: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor,
                   targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms added to the task loss (each is also logged)."""
        return {}

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def on_evaluate(self, loader: DataLoader, predictions: torch.Tensor) -> dict[str, float]:
        """Extra metrics at each validation-split evaluation, given the model's top-1 classes on
        ``loader`` (in its order) from the loop's own pass; logged as named. Under torchrun
        ``loader`` is this process's shard and the values are averaged over processes."""
        return {}

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        pass


def lr_at(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Learning rate at optimizer step ``step`` of ``total`` under ``cfg``'s schedule."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "onecycle":
        # 1-cycle (Smith): cosine up from lr/25 over the warm-up (30% by default), cosine down
        # to lr/1e4
        warm = warm or max(1, int(0.3 * total))
        if step < warm:
            return _cos(cfg.lr / 25, cfg.lr, step / warm)
        return _cos(cfg.lr, cfg.lr / 1e4, (step - warm) / max(1, total - warm))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** (step // (cfg.step_size * steps_per_epoch))
    if cfg.schedule == "cosine":
        return _cos(cfg.lr, cfg.min_lr, t)
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - cfg.min_lr) * t
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def _cos(start: float, end: float, t: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


def epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{epoch}".encode()).digest()[:4], "little")


def frozen_parameters(model: nn.Module, patterns: Sequence[str]) -> set[str]:
    return {n for n, _ in model.named_parameters() if any(fnmatch.fnmatch(n, p) for p in patterns)}


class Trainer:
    """Trains ``model`` on ``data`` for ``cfg.epochs`` epochs; see the module docstring."""

    def __init__(
        self, model: nn.Module, data: DataBundle, cfg: TrainConfig, *,
        device: torch.device, seed: int, hooks: Sequence[TrainHook] = (),
        lr_fn: LrFn | None = None, checkpoint_dir: Path | None = None, fingerprint: str = "",
        log: Callable[[dict[str, float], int], None] | None = None, desc: str = "train",
    ):
        self.model, self.data, self.cfg = model.to(device), data, cfg
        self.device, self.seed, self.hooks = device, seed, list(hooks)
        self.checkpoint_dir, self.fingerprint = checkpoint_dir, fingerprint
        self.log, self.desc = log or (lambda metrics, step: None), desc
        self.steps_per_epoch = max(1, len(data.train_loader()))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.lr_fn = lr_fn or (lambda step, total: lr_at(cfg, step, total, self.steps_per_epoch))
        self.extra = nn.ModuleDict({k: m for h in self.hooks for k, m in h.modules().items()})
        self.extra.to(device)
        frozen = frozen_parameters(model, cfg.freeze)
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad] + list(self.extra.parameters())
        self.optimizer = self._optimizer(params)
        # grad_clip bounds the norm of every update, the hooks' modules (adapters) included
        self.clipped = params
        self.history: list[dict[str, float]] = []
        self.start_epoch = 0
        self._ddp: nn.Module | None = None  # the DistributedDataParallel wrapper during fit

    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        c = self.cfg
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov
                                   and c.momentum > 0, weight_decay=c.weight_decay)
        return torch.optim.AdamW(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay)

    # -- the loop -----------------------------------------------------------------------------

    def fit(self) -> list[dict[str, float]]:
        """Train (resuming from the last epoch checkpoint if one matches) and return history."""
        self._maybe_resume()
        self._replicate()
        for hook in self.hooks:
            hook.on_train_start(self)
        generator = torch.Generator()
        loader = self.data.train_loader(generator)
        # per-epoch evaluation (history, best-epoch choices) on the validation split, never
        # the test set; none without one
        val_loader = self.data.val_loader(shard=True) if self.data.val is not None else None
        main = dist.is_main()
        for epoch in range(self.start_epoch, self.cfg.epochs):
            torch.manual_seed(epoch_seed(self.seed, epoch))
            generator.manual_seed(epoch_seed(self.seed + 1, epoch))
            started = time.perf_counter()
            metrics = self._train_epoch(loader, epoch)
            last = epoch + 1 == self.cfg.epochs
            if val_loader is not None and (last or (epoch + 1) % self.cfg.eval_every == 0):
                metrics.update(self._evaluate(val_loader))
            metrics["epoch_time_s"] = time.perf_counter() - started
            self.history.append({"epoch": epoch + 1, **metrics})
            for hook in self.hooks:
                hook.on_epoch_end(epoch, metrics)
            if main:  # one writer and one logger: rank 0
                self._save_checkpoint(epoch + 1)
                self.log(metrics, epoch + 1)
                _print_epoch(self.desc, epoch + 1, self.cfg.epochs, metrics)
        self._ddp = None  # later code (scoring, the next phase) sees the plain module
        # BatchNorm statistics are updated per rank: leave with rank 0's everywhere
        dist.broadcast_module(self.model)
        dist.broadcast_module(self.extra)
        return self.history

    def _replicate(self) -> None:
        """Under torchrun: rank 0's weights, hook modules and masks on every rank, and the
        model wrapped in DistributedDataParallel (which averages its gradients)."""
        if dist.world_size() == 1:
            return

        dist.check_same_structure(self.model, self.desc)
        dist.broadcast_module(self.extra)
        for hook in self.hooks:
            if shared := hook.shared_tensors():
                dist.broadcast_tensors(shared)
        if any(p.requires_grad for p in self.model.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.model, device_ids=ids)
        else:
            dist.broadcast_module(self.model)

    def _evaluate(self, loader: DataLoader) -> dict[str, float]:
        """``val_*`` metrics on the validation split and the hooks' ``on_evaluate`` metrics,
        from one pass of the model; under torchrun each rank evaluates its shard."""
        if dist.world_size() > 1:
            dist.broadcast_module(self.model)  # the same BatchNorm statistics on every shard
        predictions: list[torch.Tensor] = []
        metrics = {f"val_{k}": v for k, v in
                   evaluate(self.model, loader, self.device, predictions).items()}
        top1 = torch.cat(predictions)
        for hook in self.hooks:
            metrics.update(hook.on_evaluate(loader, top1))
        if dist.world_size() == 1:
            return metrics
        return dist.all_reduce_mean(metrics, len(loader.dataset))

    def _train_epoch(self, loader, epoch: int) -> dict[str, float]:
        self.model.train()
        self.extra.train()
        sums: dict[str, float] = {}
        seen = correct = 0
        step = epoch * self.steps_per_epoch
        ce_weight = math.prod(getattr(h, "ce_weight", 1.0) for h in self.hooks)
        bar = tqdm(loader, desc=f"{self.desc} {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=None if dist.is_main() else True)
        forward = self._ddp or self.model
        for x, y in bar:
            x, y = x.to(self.device), y.to(self.device)
            lr = self.lr_fn(step, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            out = forward(x)
            terms = {"ce": F.cross_entropy(out, y, label_smoothing=self.cfg.label_smoothing)}
            if ce_weight != 1.0:
                terms["ce"] = ce_weight * terms["ce"]
            for hook in self.hooks:
                terms.update(hook.extra_loss(self.model, x, out, y))
            # one term (plain training): no extra add in the graph; the loss read once, as a
            # number, serves the finiteness check and the epoch's sums (per-step tensor ops are
            # what a small model's epoch is made of: benchmarks/data_throughput.py)
            loss = terms["ce"] if len(terms) == 1 else sum(terms.values())
            value = loss.item()
            # every rank must raise together, or the others would wait for it forever
            if not dist.all_ranks_true(math.isfinite(value)):
                shown = value if not math.isfinite(value) else "non-finite on another process"
                raise CompressPipeError(
                    f"{self.desc}: loss became {shown} at epoch {epoch + 1}, step {step}; "
                    f"lower the learning rate (lr={lr:.3g}) or enable grad_clip"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dist.average_gradients(list(self.extra.parameters()))  # DDP covers the model's
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.clipped, self.cfg.grad_clip)
            self.optimizer.step()
            step += 1
            for hook in self.hooks:
                hook.after_step(self.model, step)
            n = y.numel()
            seen += n
            correct += (out.argmax(1) == y).sum().item()
            sums["loss"] = sums.get("loss", 0.0) + value * n
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + (value if v is loss else v.item()) * n
        if dist.world_size() > 1:  # the epoch's metrics over every rank's shard
            keys = sorted(sums)
            totals = dist.all_reduce_sum([seen, correct, *(sums[k] for k in keys)])
            seen, correct, sums = totals[0], totals[1], dict(zip(keys, totals[2:], strict=True))
        metrics = {f"train_{k}": v / max(seen, 1) for k, v in sums.items()}
        metrics["train_top1"] = 100.0 * correct / max(seen, 1)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    # -- checkpoints --------------------------------------------------------------------------

    def _save_checkpoint(self, epochs_done: int) -> None:
        if self.checkpoint_dir is None:
            return


        tensors = {f"model.{k}": v.detach().cpu().contiguous()
                   for k, v in self.model.state_dict().items()}
        tensors.update({f"extra.{k}": v.detach().cpu().contiguous()
                        for k, v in self.extra.state_dict().items()})
        opt_tensors, opt_json = _flatten_optimizer(self.optimizer.state_dict())
        tensors.update(opt_tensors)
        meta = {"fingerprint": self.fingerprint, "epochs_done": epochs_done,
                "history": self.history, "optimizer": opt_json}
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_dir / f".{CHECKPOINT_FILE}.tmp"
        # shared storage (tied weights) must not be saved twice: clone breaks the sharing
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp),
                  metadata={"compresspipe": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint_dir / CHECKPOINT_FILE)

    def _maybe_resume(self) -> None:
        path = (self.checkpoint_dir / CHECKPOINT_FILE) if self.checkpoint_dir else None

        if dist.world_size() > 1:
            # rank 0 wrote it, possibly on another node: every rank resumes from its bytes
            exists = dist.is_main() and path is not None and path.is_file()
            data = dist.broadcast_bytes(path.read_bytes() if exists else None)
            if not data:
                return
            meta, source = _checkpoint_meta(data), data
        else:
            if path is None or not path.is_file():
                return
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {}).get("compresspipe", "{}"))
            source = str(path)
        if meta.get("fingerprint") != self.fingerprint:
            print(f"[{self.desc}] ignoring a checkpoint from a different configuration: {path}")
            return
        tensors = load(source) if isinstance(source, bytes) else load_file(source)
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.extra.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("extra.")})
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        self.history = meta["history"]
        self.start_epoch = meta["epochs_done"]
        print(f"[{self.desc}] resumed after epoch {self.start_epoch} from {path}")


def _checkpoint_meta(data: bytes) -> dict[str, Any]:
    """Our metadata from a safetensors file's bytes (8-byte header length, JSON header)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + size])
    return json.loads(header.get("__metadata__", {}).get("compresspipe", "{}"))


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as safetensors-ready tensors plus a JSON skeleton (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        slots = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
                slots[key] = {"tensor": f"optim.{idx}.{key}"}
            else:
                slots[key] = {"value": value}
        skeleton["state"][str(idx)] = slots
    return tensors, skeleton


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], skeleton: dict[str, Any]) -> dict:
    state = {
        int(idx): {k: tensors[s["tensor"]] if "tensor" in s else s["value"] for k, s in slots.items()}
        for idx, slots in skeleton["state"].items()
    }
    return {"state": state, "param_groups": skeleton["param_groups"]}


def _print_epoch(desc: str, epoch: int, epochs: int, m: dict[str, float]) -> None:
    parts = [f"loss {m['train_loss']:.4f}", f"lr {m['lr']:.3g}"]
    if "val_top1" in m:
        parts += [f"val top1 {m['val_top1']:.2f}%", f"val loss {m['val_loss']:.4f}"]
    print(f"[{desc}] epoch {epoch}/{epochs}: " + ", ".join(parts) + f" ({m['epoch_time_s']:.1f}s)",
          flush=True)
