"""Moving-average observer + fake quantization for QAT, with fast per-channel weights.

torchao's ``FusedMovingAvgObsFakeQuantize`` calls ``torch.fused_moving_avg_obs_fake_quant``,
whose CPU kernels are slow on per-channel weights: per-channel ``aminmax`` takes ~25x longer
than ``amin`` + ``amax``, and ``fake_quantize_per_channel_affine_cachemask`` ~8x longer than the
same arithmetic as vectorized tensor ops (measured on a 512x512x3x3 weight, one thread). On a
resnet18 at 32x32 pixels, where the weights outweigh the activations, that was a third of a QAT
step. This module keeps torchao's class (so ``prepare_qat_pt2e``, ``disable_observer`` and
``convert_pt2e`` treat it as theirs) and replaces only the arithmetic:

* statistics: the same moving average of min/max (first batch sets them), per tensor or per
  channel, then the observer's own ``calculate_qparams`` — the scales the converted int8 model
  will use;
* fake quantization: ``(clamp(round(x / s) + z, lo, hi) - z) * s`` as in-place tensor ops,
  the gradient passed where ``round(x / s) + z`` lies in [lo, hi] — bit for bit what torch's
  ops compute on float32 inputs, per tensor and per channel (other dtypes go to torch's ops,
  which compute the grid in float32).
"""

from __future__ import annotations

import torch
from torchao.quantization.pt2e import FusedMovingAvgObsFakeQuantize


class _FakeQuantSTE(torch.autograd.Function):
    """``(clamp(round(x * inv) + z, lo, hi) - z) * s`` with a straight-through gradient.

    ``inv``, ``z`` and ``s`` broadcast against ``x`` (per tensor or per channel). The forward
    works in place on one new tensor: on CPU every fresh large tensor costs page faults, and
    the out-of-place chain was ~10x slower than the arithmetic. The pass-through mask is
    recomputed in backward instead of stored.
    """

    @staticmethod
    def forward(ctx, x, inv, z, s, lo: int, hi: int):
        ctx.save_for_backward(x, inv, z)
        ctx.lo, ctx.hi = lo, hi
        return x.mul(inv).round_().add_(z).clamp_(lo, hi).sub_(z).mul_(s)

    @staticmethod
    def backward(ctx, grad):
        x, inv, z = ctx.saved_tensors
        q = x.mul(inv).round_().add_(z)
        return grad * ((q >= ctx.lo) & (q <= ctx.hi)), None, None, None, None, None


def fake_quantize_per_channel(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                              axis: int, lo: int, hi: int) -> torch.Tensor:
    """``torch.fake_quantize_per_channel_affine``: the same forward and gradient, faster on CPU.
    Other than float32, torch's op (it computes the grid in float32 for every input dtype)."""
    if x.dtype != torch.float32:
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point.to(torch.int32), axis,
                                                      lo, hi)
    shape = [1] * x.dim()
    shape[axis] = -1
    s = scale.detach().to(x.dtype).reshape(shape)
    # fresh tensors: an observer may update its scale in place before backward runs
    return _FakeQuantSTE.apply(x, 1.0 / s, zero_point.to(x.dtype).reshape(shape), s, lo, hi)


def fake_quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                             lo: int, hi: int) -> torch.Tensor:
    """``torch.fake_quantize_per_tensor_affine``: the same forward and gradient, faster on CPU.
    Other than float32, torch's op."""
    if x.dtype != torch.float32:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point.to(torch.int32), lo, hi)
    s = scale.detach().to(x.dtype).reshape(())
    return _FakeQuantSTE.apply(x, 1.0 / s, zero_point.to(x.dtype).reshape(()), s, lo, hi)


class FastMovingAvgObsFakeQuantize(FusedMovingAvgObsFakeQuantize):
    """torchao's fused observer + fake quantizer, computed with fast tensor ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        obs = self.activation_post_process
        if self.observer_enabled[0] == 1:
            self._observe(x.detach())
        if self.fake_quant_enabled[0] != 1:
            return x
        lo, hi = obs.quant_min, obs.quant_max
        if self.is_per_channel:
            return fake_quantize_per_channel(x, self.scale, self.zero_point, self.ch_axis, lo, hi)
        return fake_quantize_per_tensor(x, self.scale, self.zero_point, lo, hi)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        obs = self.activation_post_process
        if self.is_per_channel:
            flat = x.transpose(0, self.ch_axis).flatten(1) if self.ch_axis else x.flatten(1)
            low, high = flat.amin(1), flat.amax(1)
        else:
            low, high = x.amin(), x.amax()
        first = obs.min_val.numel() == 0 or bool(torch.isinf(obs.min_val).any())
        if first:
            if obs.min_val.shape != low.shape:
                obs.min_val.resize_(low.shape)
                obs.max_val.resize_(high.shape)
            obs.min_val.copy_(low)
            obs.max_val.copy_(high)
        else:
            c = obs.averaging_constant
            obs.min_val.add_(low - obs.min_val, alpha=c)
            obs.max_val.add_(high - obs.max_val, alpha=c)
        scale, zero_point = obs.calculate_qparams()
        if self.scale.shape != scale.shape:
            self.scale.resize_(scale.shape)
            self.zero_point.resize_(zero_point.shape)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
