"""Uniform (scalar) weight quantization with a trained step, as NNCodec quantizes.

A layer's codebook is an integer grid, ``codebook[i] = levels[i] * step``, one step per layer;
with Huffman coding after it this is the entropy-coded uniform quantizer of the coding
literature, where k-means (``cluster``) is the fixed-rate one. The storage convention is
``cluster``'s, so the Huffman stage and every reader take it unchanged:

* with a pruning mask, index 0 is the exact zero of the pruned weights and only them; the
  survivors take the nonzero levels ±1 … ±L, L = 2**(bits-1) - 1 (after magnitude pruning no
  survivor is near zero, and a survivor never becomes a new zero);
* without a mask, zero is one level among -L … L;
* the last entry is a spare code no weight uses (2**bits entries, 2L + 1 levels).

The initial step minimises the squared error over the layer's weights (a grid search over
clipping points, then least-squares refinement of the step for the assignment); fine-tuning
(``CentroidHook``) trains the step alone: each weight's gradient becomes its level times
dL/dstep, so SGD moves every weight along its own level, and after each step the step is
re-fitted by least squares, which keeps the grid exact under any optimizer.
"""

from __future__ import annotations

import torch

from ...core.errors import CompressPipeError
from .cluster import ClusteredLayer

CLIP_POINTS = 128  # candidate steps between max|w| / (64 L) and max|w| / L


def uniform_levels(bits: int, masked: bool) -> torch.Tensor:
    """The integer level of every codebook entry (int64, 2**bits entries; see the module)."""
    if bits < 2:
        raise CompressPipeError(f"uniform quantization needs at least 2 bits, got {bits}")
    top = 2 ** (bits - 1) - 1
    levels = [0] + [j for j in range(-top, top + 1) if j != 0] if masked \
        else list(range(-top, top + 1))
    levels.append(top + 1)  # the spare code
    return torch.tensor(levels, dtype=torch.int64)


def _assign(w: torch.Tensor, step: float, top: int, nonzero: bool) -> torch.Tensor:
    """Nearest level of each value on the grid ``j * step``, |j| <= top (j != 0 if
    ``nonzero``: a value between -step/2 and step/2 goes to ±1 by its sign)."""
    j = torch.clamp(torch.round(w / step), -top, top)
    if nonzero:
        j = torch.where(j == 0, torch.where(w < 0, -1.0, 1.0).to(w.dtype), j)
    return j


def fit_step(w: torch.Tensor, top: int, nonzero: bool, refine: int = 10) -> float:
    """The step that minimises sum (w - step * level(w))**2: the best of ``CLIP_POINTS``
    clipping points, refined by alternating assignment and least squares."""
    w = w.double()
    peak = float(w.abs().max()) if w.numel() else 0.0
    if peak == 0.0:
        return 1.0  # an all-zero layer: any step gives the same (exact) weights
    best_step, best_err = peak / top, float("inf")
    for t in torch.logspace(-6, 0, CLIP_POINTS, base=2.0, dtype=torch.float64).tolist():
        step = peak * t / top
        err = float((w - step * _assign(w, step, top, nonzero)).square().sum())
        if err < best_err:
            best_step, best_err = step, err
    for _ in range(refine):
        j = _assign(w, best_step, top, nonzero)
        denom = float(j.square().sum())
        if denom == 0.0:
            break
        step = float((j * w).sum()) / denom
        if step <= 0 or abs(step - best_step) <= 1e-12 * best_step:
            break
        best_step = step
    return best_step


def uniform_weight(name: str, weight: torch.Tensor, bits: int, mask: torch.Tensor | None,
                   iters: int = 10) -> ClusteredLayer:
    """Quantize one weight tensor to a uniform grid (``iters``: least-squares refinements of
    the step); pruned weights (mask False) take index 0, the exact zero."""
    levels = uniform_levels(bits, mask is not None)
    top = 2 ** (bits - 1) - 1
    w = weight.detach().cpu().reshape(-1).double()
    keep = mask.bool().cpu().reshape(-1) if mask is not None else torch.ones_like(w, dtype=torch.bool)
    step = fit_step(w[keep], top, nonzero=mask is not None, refine=iters)
    j = _assign(w, step, top, nonzero=mask is not None).to(torch.int64)
    index_of = torch.full((2 * top + 2,), -1, dtype=torch.int64)  # level + top -> index
    real = levels[:-1]
    index_of[real + top] = torch.arange(real.numel())
    indices = index_of[j + top]
    if mask is not None:
        indices[~keep] = 0
    return ClusteredLayer(name, bits, indices.view(weight.shape),
                          (levels.double() * step).float(), 0 if mask is not None else None,
                          levels=levels)
