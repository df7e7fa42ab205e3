"""BatchNorm statistics folded into the affine scale and shift, for smaller deployed files.

In eval mode a BatchNorm computes ``(x - mean) / sqrt(var + eps) * weight + bias``: four
per-channel vectors where two suffice. Folding rewrites ``weight`` to ``weight / sqrt(var + eps)``
and ``bias`` to ``bias - mean * weight'`` and pins the statistics to values a decoder can
recreate from nothing (mean 0, and a variance whose sum with ``eps`` is exactly 1.0 in float32),
so a file only needs the two affine vectors. It is the per-channel half of folding BN into the
preceding convolution; the other half (multiplying the scale into the conv weights) is left to
the runtime, because it would give every output channel of a weight-shared conv its own
centroids and undo clustering.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def folded_variance(eps: float) -> float:
    """The float32 ``v`` nearest ``1 - eps`` with ``float32(v + eps) == 1.0`` exactly."""
    one, e = np.float32(1.0), np.float32(eps)
    v = np.float32(one - e)
    for _ in range(64):  # a few ulps at most; bounded so hostile eps cannot loop forever
        total = np.float32(v + e)
        if total == one:
            return float(v)
        v = np.nextafter(v, np.float32(-np.inf) if total > one else np.float32(np.inf))
    raise ValueError(f"no float32 variance makes var + eps == 1 for eps={eps}")


def foldable(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm whose statistics can be folded away."""
    return (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine
            and module.track_running_stats and module.running_var is not None
            and module.weight.dtype == torch.float32)


def fold_statistics(model: nn.Module, skip: set[str] = frozenset()) -> list[str]:
    """Fold every foldable BatchNorm of ``model`` in place; return their module names.

    Modules whose parameters are in ``skip`` (e.g. weight-shared tensors) are left alone.
    """
    folded = []
    with torch.no_grad():
        for name, bn in model.named_modules():
            if not foldable(bn) or {f"{name}.weight", f"{name}.bias"} & skip:
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bn.bias.copy_(bn.bias - bn.running_mean * scale)
            bn.weight.copy_(scale)
            bn.running_mean.zero_()
            bn.running_var.fill_(folded_variance(bn.eps))
            bn.num_batches_tracked.zero_()
            folded.append(name)
    return folded


def folded_statistics(bn: nn.Module) -> dict[str, torch.Tensor]:
    """The statistics tensors a folded BatchNorm ``bn`` holds (what a decoder fills in)."""
    return {
        "running_mean": torch.zeros_like(bn.running_mean),
        "running_var": torch.full_like(bn.running_var, folded_variance(bn.eps)),
        "num_batches_tracked": torch.zeros_like(bn.num_batches_tracked),
    }
