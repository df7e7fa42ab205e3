"""torchao's PT2E flow as pieces for the stages: capture, prepare (QAT or PTQ), convert.

The captured graph is an ``nn.Module`` whose parameters keep the original names
(``layer1.0.conv1.weight``), so the pipeline's one training loop, pruning masks and
checkpoints work on it unchanged. An exported graph cannot branch on ``self.training``;
``enable_train_eval`` gives it ``train()``/``eval()`` that switch batch norm and dropout
(torchao's own mechanism), plus a batch-norm freeze that keeps BN on running statistics while
the rest trains.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule

from ...core.errors import CompressPipeError
from ...core.training import TrainHook
from .qdq import QDQQuantizer, QDQScheme

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ZERO_GAMMA = 1e-6  # replaces exact-zero BN scales: QAT's simulated fold divides by them


def example_batch(dataset, n: int = 2) -> torch.Tensor:
    """The first ``n`` inputs of a dataset, stacked: the shape the model is captured with."""
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])


def capture(model: nn.Module, example: torch.Tensor, train: bool) -> GraphModule:
    """``torch.export`` a deep copy of ``model`` (batch dimension dynamic) as a GraphModule.

    The copy matters: PTQ folds batch norm into conv weights in place. A training-mode capture
    has stochastic depth switched off: see ``without_stochastic_depth``.
    """
    model = copy.deepcopy(model).cpu().train(train)
    if train:
        without_stochastic_depth(model)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        program = torch.export.export(model, (example.cpu(),), dynamic_shapes=({0: batch},))
    except Exception as exc:  # torch.export raises many types; the message is what helps
        raise CompressPipeError(
            f"torch.export could not capture the model for int8 quantization: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    return program.module()


def without_stochastic_depth(model: nn.Module) -> None:
    """Set every ``drop_prob`` (timm's DropPath, DropBlock) to 0 (the QAT stage records which,
    from ``stochastic_depth_modules``).

    Their forward tests ``self.training`` in Python, so a graph captured in training mode keeps
    the random draw (bernoulli) in every later use: torchao's switch to eval knows dropout, not
    these, and the int8 file would drop residual branches at random at inference (swin_tiny's
    int8 file scored 80.47% in one process and 81.25% in another). QAT's few epochs go without
    stochastic depth instead.
    """
    modules = dict(model.named_modules())
    for name in stochastic_depth_modules(model):
        modules[name].drop_prob = 0.0


def stochastic_depth_modules(model: nn.Module) -> list[str]:
    """Names of the modules with a ``drop_prob`` above 0 (stochastic depth, DropBlock)."""
    return [name for name, module in model.named_modules()
            if isinstance(getattr(module, "drop_prob", None), float) and module.drop_prob > 0]


def nudge_zero_bn_scales(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[str]:
    """Replace exact-zero batch-norm scales by a tiny value; return the affected BN names.

    QAT's conv-BN folding computes ``conv(x, w * s) / s`` with ``s = gamma / std``, so a zero
    gamma (timm's zero-init residual branches, or a pruned channel) yields NaN. A masked gamma
    cannot be nudged (it must stay zero), so that is an error naming the tensor.
    """
    nudged = []
    for name, module in model.named_modules():
        if not isinstance(module, BN_TYPES) or module.weight is None:
            continue
        zero = module.weight.detach() == 0
        if not zero.any():
            continue
        if f"{name}.weight" in masks:
            raise CompressPipeError(
                f"qat: batch-norm scale {name}.weight is pruned (masked to zero); conv-BN "
                f"folding divides by it. Remove the channels structurally or use 'ptq'.")
        with torch.no_grad():
            module.weight[zero] = ZERO_GAMMA
        nudged.append(name)
    return nudged


def prepare_qat(model: nn.Module, example: torch.Tensor, scheme: QDQScheme) -> GraphModule:
    """Capture in training mode and insert fake quantization (conv-BN folding simulated)."""
    # lazy: torchao loads only in the int8 stages
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    return prepare_qat_pt2e(capture(model, example, train=True), QDQQuantizer(scheme))


def prepare_ptq(model: nn.Module, example: torch.Tensor, scheme: QDQScheme) -> GraphModule:
    """Capture in inference mode (BN folded into convs) and insert observers."""
    # lazy: torchao loads only in the int8 stages
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    return prepare_pt2e(capture(model, example, train=False), QDQQuantizer(scheme))


@torch.no_grad()
def calibrate(prepared: GraphModule, loader, batches: int) -> int:
    """Feed ``batches`` batches through the observers; return the images seen."""
    seen = 0
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        prepared(x)
        seen += len(x)
    return seen


def convert(prepared: GraphModule) -> GraphModule:
    """Real int8 graph in QDQ form: int8 weight constants, quantize/dequantize around ops."""
    # lazy: torchao loads only in the int8 stages
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared = prepared.cpu()
    move_exported_model_to_eval(prepared)
    converted = convert_pt2e(prepared)
    nn.Module.train(converted, False)  # the module flag only; the graph is already in eval form
    return converted


@dataclass
class ModeState:
    """What ``train()`` means for an exported graph right now."""

    bn_frozen: bool = False
    observers_frozen: bool = False


def enable_train_eval(gm: GraphModule) -> ModeState:
    """Give an exported graph working ``train()``/``eval()``; return its switchable state.

    ``eval()`` also stops the observers: the loop evaluates on the test set every epoch, and
    observers left on would fit the int8 scales to test images. ``train()`` restarts them
    unless the QAT schedule has frozen them.
    """
    from torchao.quantization.pt2e import (
        disable_observer,
        enable_observer,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )  # lazy: torchao loads only in the int8 stages

    state = ModeState()

    def _train(self, mode: bool = True):
        self.training = mode
        if mode and not state.bn_frozen:
            move_exported_model_to_train(self)
        else:
            move_exported_model_to_eval(self)
        self.apply(enable_observer if mode and not state.observers_frozen else disable_observer)
        return self

    gm.train = types.MethodType(_train, gm)  # type: ignore[method-assign]
    gm.eval = types.MethodType(lambda self: self.train(False), gm)  # type: ignore[method-assign]
    return state


class QATScheduleHook(TrainHook):
    """Freezes batch-norm statistics and then the observers after configured epochs.

    Freezing BN late in QAT stops the running statistics (which the int8 model folds into its
    weights) from chasing the fake-quantized activations; freezing observers fixes scales and
    zero points so the last epochs fine-tune against the grid that will be deployed.
    """

    def __init__(self, model: GraphModule, state: ModeState, freeze_bn_after: int | None,
                 freeze_observers_after: int | None):
        self.model, self.state = model, state
        self.freeze_bn_after, self.freeze_observers_after = freeze_bn_after, freeze_observers_after

    def on_train_start(self, trainer) -> None:
        # a resumed run restores observer flags from the checkpoint; BN state is recomputed
        self._apply(trainer.start_epoch)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self._apply(epoch + 1)
        metrics["qat_bn_frozen"] = float(self.state.bn_frozen)
        metrics["qat_observers_frozen"] = float(self.state.observers_frozen)

    def _apply(self, epochs_done: int) -> None:
        # lazy: torchao loads only in the int8 stages
        from torchao.quantization.pt2e import disable_observer

        if self.freeze_bn_after is not None and epochs_done >= self.freeze_bn_after:
            self.state.bn_frozen = True
        if (self.freeze_observers_after is not None
                and epochs_done >= self.freeze_observers_after and not self.state.observers_frozen):
            self.model.apply(disable_observer)
            self.state.observers_frozen = True


def copy_trained_weights(prepared: GraphModule, model: nn.Module) -> None:
    """Copy the QAT-trained parameters and BN statistics back into the original module."""
    trained = prepared.state_dict()
    target = model.state_dict()
    missing = [k for k in target if k not in trained]
    if missing:
        raise CompressPipeError(f"qat: the captured graph lost tensors {missing[:3]} of the model")
    model.load_state_dict({k: trained[k].detach().to(target[k].device) for k in target})
