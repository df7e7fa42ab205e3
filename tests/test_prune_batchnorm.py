"""At 99% sparsity the pruned network must evaluate as it trains (issue 14: every magnitude
method on resnet10t ended at chance with a test loss above ln 10 while its train loss fell).

The mechanism, measured there: channels cut off from the input feed the next BatchNorm a
constant; its running variance is a residue near zero and its running mean lags the constant,
so in eval mode the lag is divided by ~sqrt(eps). After every retraining phase the pruner now
recomputes the running statistics at the final weights; these tests fail without that.
"""

from __future__ import annotations

import torch
from torch import nn

from compresspipe.compress.pruning.config import PruneConfig
from compresspipe.compress.pruning.methods import get_method
from compresspipe.compress.pruning.pruner import Pruner
from compresspipe.core.artifact import Artifact
from compresspipe.core.config import DataConfig, TrainConfig
from compresspipe.core.context import RunContext
from compresspipe.core.data import build_data

CPU = torch.device("cpu")


def _cut_off_net() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """conv(1→4) BN ReLU conv(4→4) BN ReLU → fc, no padding (a constant input stays constant);
    masks leave stem channels 1–3 without weights and second-layer channel 0 reading only them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with torch.no_grad():
        model[1].bias.fill_(0.5)  # dead stem channels then output relu(0.5), not 0
    stem = torch.ones(4, 1, 3, 3, dtype=torch.bool)
    stem[1:] = False
    second = torch.ones(4, 4, 3, 3, dtype=torch.bool)
    second[0, 0] = False
    return model, {"0.weight": stem, "3.weight": second}


def _retrained(tmp_path, recalibrate_bn: int) -> nn.Module:
    data = build_data(DataConfig(name="digits", image_size=8, batch_size=32, limit_train=128))
    model, masks = _cut_off_net()
    ctx = RunContext(name="prune", data=data, device=CPU, seed=0, work_dir=tmp_path,
                     fingerprint=f"bn{recalibrate_bn}", log_metrics=lambda metrics, step: None)
    cfg = PruneConfig(method="oneshot", sparsity=0.5, include=["8.weight"],
                      recalibrate_bn=recalibrate_bn, train=TrainConfig(epochs=1, lr=0.05))
    pruner = Pruner(cfg, Artifact(model=model, spec={}, masks=masks), ctx)
    get_method("oneshot")(pruner)
    return pruner.model.eval()


def test_cut_off_channels_evaluate_as_they_train(tmp_path):
    model = _retrained(tmp_path, PruneConfig().recalibrate_bn)
    x = torch.rand(5, 1, 8, 8)
    seen = {}
    model[4].register_forward_hook(lambda m, i, o: seen.update(out=o))
    with torch.no_grad():
        model(x)
    # stem channels 1–3 carry exactly zero: mean and variance 0
    assert torch.equal(model[1].running_mean[1:], torch.zeros(3))
    assert torch.equal(model[1].running_var[1:], torch.zeros(3))
    # channel 0 of the second layer is a constant; in training BatchNorm maps it to its bias
    assert torch.allclose(seen["out"][:, 0], model[4].bias[0].expand(5, 6 - 2, 6 - 2), atol=1e-4)


def test_recalibration_can_be_turned_off(tmp_path):
    # the moving averages (today's behaviour) are off by far more than the tolerance above
    model = _retrained(tmp_path, 0)
    assert model[1].running_var[1:].abs().max() > 1e-3
