"""The QAT fake quantizer: torch's arithmetic and gradient bit for bit, torchao's statistics."""

from __future__ import annotations

import pytest
import torch
from torchao.quantization.pt2e import (
    FusedMovingAvgObsFakeQuantize,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    disable_observer,
)

from compresspipe.compress.quant.fake_quant import (
    FastMovingAvgObsFakeQuantize,
    fake_quantize_per_channel,
    fake_quantize_per_tensor,
)


def _grad(fn, x):
    x = x.clone().requires_grad_()
    y = fn(x)
    weights = torch.arange(y.numel(), dtype=y.dtype).view_as(y)  # every output counts differently
    (g,) = torch.autograd.grad((y * weights).sum(), x)
    return y.detach(), g


@pytest.mark.parametrize("lo,hi", [(-127, 127), (-128, 127), (0, 255)])
def test_per_channel_matches_torch(lo, hi):
    torch.manual_seed(0)
    x = torch.randn(16, 4, 3, 3) * 3
    scale = torch.rand(16) * 0.05 + 0.005
    zp = torch.zeros(16, dtype=torch.int32) if lo < 0 else torch.randint(0, 255, (16,), dtype=torch.int32)
    ref = _grad(lambda t: torch.fake_quantize_per_channel_affine(t, scale, zp, 0, lo, hi), x)
    ours = _grad(lambda t: fake_quantize_per_channel(t, scale, zp, 0, lo, hi), x)
    assert torch.equal(ref[0], ours[0]) and torch.equal(ref[1], ours[1])
    assert (ref[1] == 0).any() and (ref[1] != 0).any()  # some values clipped, some passed


@pytest.mark.parametrize("lo,hi,zp", [(0, 255, 117), (-128, 127, 0), (0, 127, 3)])
def test_per_tensor_matches_torch(lo, hi, zp):
    torch.manual_seed(1)
    x = torch.randn(8, 6, 5, 5) * 2
    scale, zero = torch.tensor([0.013]), torch.tensor([zp], dtype=torch.int32)
    ref = _grad(lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zero, lo, hi), x)
    ours = _grad(lambda t: fake_quantize_per_tensor(t, scale, zero, lo, hi), x)
    assert torch.equal(ref[0], ours[0]) and torch.equal(ref[1], ours[1])
    assert (ref[1] == 0).any() and (ref[1] != 0).any()


@pytest.mark.parametrize("per_channel", [False, True])
def test_statistics_and_output_match_torchao(per_channel):
    if per_channel:
        kw = {"observer": MovingAveragePerChannelMinMaxObserver, "quant_min": -127,
              "quant_max": 127, "dtype": torch.int8, "qscheme": torch.per_channel_symmetric,
              "ch_axis": 0}
    else:
        kw = {"observer": MovingAverageMinMaxObserver, "quant_min": 0, "quant_max": 255,
              "dtype": torch.uint8, "qscheme": torch.per_tensor_affine}
    ref, ours = FusedMovingAvgObsFakeQuantize(**kw), FastMovingAvgObsFakeQuantize(**kw)
    torch.manual_seed(2)
    for step in range(4):
        x = torch.randn(8, 3, 4, 4) * (1 + step)
        a, b = ref(x), ours(x)
        ref_obs, our_obs = ref.activation_post_process, ours.activation_post_process
        torch.testing.assert_close(our_obs.min_val, ref_obs.min_val)
        torch.testing.assert_close(our_obs.max_val, ref_obs.max_val)
        # the grid trained on is the one convert_pt2e deploys (the observer's qparams); the
        # fused kernel's symmetric per-channel scales differ from those by up to 1/254
        scale, zero = our_obs.calculate_qparams()
        assert torch.equal(ours.scale, scale) and torch.equal(ours.zero_point, zero)
        if per_channel:
            torch.testing.assert_close(ours.scale, ref.scale, rtol=1 / 250, atol=0)
        else:
            torch.testing.assert_close(ours.scale, ref.scale)
        assert torch.equal(ours.zero_point, ref.zero_point)
        torch.testing.assert_close(b, a, rtol=0, atol=float(ours.scale.max()))
    # frozen observers keep the grid: a wider batch is clipped to it
    ours.apply(disable_observer)
    before = ours.scale.clone()
    ours(torch.randn(8, 3, 4, 4) * 100)
    assert torch.equal(ours.scale, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_match_torch(dtype):
    torch.manual_seed(3)
    x = (torch.randn(8, 4, 3, 3) * 3).to(dtype)
    scale = torch.rand(8) * 0.05 + 0.005
    zp = torch.zeros(8, dtype=torch.int32)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, 0, -127, 127)
    assert torch.equal(fake_quantize_per_channel(x, scale, zp, 0, -127, 127), ref)
    s, z = torch.tensor([0.02]), torch.tensor([7], dtype=torch.int32)
    ref = torch.fake_quantize_per_tensor_affine(x, s, z, 0, 255)
    assert torch.equal(fake_quantize_per_tensor(x, s, z, 0, 255), ref)
