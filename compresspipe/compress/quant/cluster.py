"""Deep Compression weight sharing: per-layer k-means codebooks, centroid fine-tuning.

Han et al. (2016): the weights of one layer are clustered into k = 2^bits shared values
(1-D k-means, centroids initialised linearly between the layer's min and max); each weight then
stores only its cluster index. Fine-tuning trains the centroids: the gradient of centroid
C_k is the sum of the gradients of its members, dL/dC_k = sum_{i: idx_i = k} dL/dW_i.

Implemented as a training hook on the unchanged model (so parameter names, masks, checkpoints
and the one training loop all still apply): a gradient hook replaces every member's gradient by
its centroid's summed gradient. All members of a cluster then receive identical updates from
any element-wise optimizer (SGD with momentum and weight decay, AdamW) and stay equal; after each
step the layer is re-projected onto its codebook anyway, so ``weight == codebook[indices]``
holds bit-exactly at every step.

Storage convention (what the Huffman stage consumes)
----------------------------------------------------
For every clustered parameter ``P`` (a conv or linear ``.weight``):

* ``artifact.extras["cluster.P.indices"]``: the index of every weight, same shape as the
  weight, dtype ``uint8`` for bits <= 8 else ``uint16``;
* ``artifact.extras["cluster.P.codebook"]``: ``float32`` of length exactly ``2**bits``
  (entries no weight uses are kept, so every index value is valid);
* the weight is ``codebook[indices.long()]``, bit-exactly equal to the model's ``P``;
* ``artifact.quant["cluster"]["layers"][P]``: ``bits``, ``shape``, ``index_dtype``,
  ``zero_index``, ``used_centroids``, ``pruned``.

``zero_index`` is ``0`` when the parameter has a pruning mask: then ``codebook[0] == 0.0``
exactly, is never trained, and **index 0 is used by exactly the pruned weights** (mask False);
the other ``2**bits - 1`` centroids cluster the surviving weights. Without a mask,
``zero_index`` is ``None`` and all ``2**bits`` centroids are free.

A codebook may instead be a uniform grid (``uniform``: ``levels * step``, the step trained
instead of the centroids); the storage convention above is the same.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...core import artifact_keys
from ...core.artifact import Artifact, register_deploy_format
from ...core.errors import CompressPipeError
from ...core.models import build_from_spec
from ...core.training import TrainHook

DEPLOY_FORMAT = "codebook"
CODEBOOK_FILE = "model.codebook.safetensors"
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class ClusteredLayer:
    """One parameter's codebook and indices (indices kept as int64 while training)."""

    name: str
    bits: int
    indices: torch.Tensor  # int64, shape of the weight
    codebook: torch.Tensor  # float32, 2**bits entries
    zero_index: int | None
    # a uniform grid (``uniform``): codebook = levels * step, and fine-tuning trains the step
    levels: torch.Tensor | None = None
    representatives: torch.Tensor = field(init=False)  # one member's flat position per centroid

    def __post_init__(self) -> None:
        self.representatives = first_member(self.indices, self.codebook.numel())

    def weight(self) -> torch.Tensor:
        return self.codebook[self.indices]


# (name, weight, bits, mask or None, iterations) -> its codebook and indices
Quantizer = Callable[[str, torch.Tensor, int, torch.Tensor | None, int], ClusteredLayer]


# -- which layers, how many bits ------------------------------------------------------------------


def layer_bits(model: nn.Module, conv_bits: int | None, linear_bits: int | None,
               overrides: Mapping[str, int | None]) -> dict[str, int]:
    """{weight name: bits} for every conv and linear layer. An override pattern (fnmatch on
    the module or the weight name; the first matching pattern wins) sets bits, or None to
    leave that layer unclustered."""
    out: dict[str, int] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, CONV_TYPES):
            bits = conv_bits
        elif isinstance(module, nn.Linear):
            bits = linear_bits
        else:
            continue
        name = f"{module_name}.weight"
        for pattern, value in overrides.items():
            if fnmatch.fnmatch(module_name, pattern) or fnmatch.fnmatch(name, pattern):
                bits = value
                break
        if bits is not None:
            out[name] = bits
    return out


def unmatched_overrides(model: nn.Module, overrides: Mapping[str, Any]) -> list[str]:
    """Override patterns that name no conv or linear layer (a typo must not pass silently)."""
    names = [(m, f"{m}.weight") for m, mod in model.named_modules()
             if isinstance(mod, (*CONV_TYPES, nn.Linear))]
    return [p for p in overrides
            if not any(fnmatch.fnmatch(m, p) or fnmatch.fnmatch(w, p) for m, w in names)]


# -- bits per layer under a bytes budget ------------------------------------------------------------


def clustered_bytes(counts: Mapping[str, int], bits: Mapping[str, int]) -> int:
    """Bytes of clustered layers stored compactly: ``counts[layer]`` indices (the weights a
    layer stores: its survivors when pruned) packed at fixed length, plus fp32 codebooks of
    2**bits entries. The budget ``bits_under_budget`` meets; positions of pruned weights and
    entropy coding (the huffman stage) are not in it."""
    index_bits = sum(bits[n] * counts[n] for n in bits)
    return (index_bits + 7) // 8 + sum(4 * 2 ** b for b in bits.values())


def bits_under_budget(counts: Mapping[str, int],
                      scan: Mapping[str, list[tuple[int, float]]] | None, budget: int,
                      choices: list[int]) -> dict[str, int]:
    """Bits per layer whose ``clustered_bytes`` fit ``budget``.

    Without a scan: the most bits every layer can share. With a sensitivity scan ({layer:
    [(bits, validation loss increase)]}), greedy from the most bits: lower the layer whose next
    lower choice costs the least loss increase per byte saved, until the budget is met."""
    choices = sorted(set(choices))
    bits = dict.fromkeys(counts, choices[-1])
    fewest = clustered_bytes(counts, dict.fromkeys(counts, choices[0]))
    if fewest > budget:
        raise ValueError(f"the bytes budget {budget:,} is below what the fewest bits give "
                         f"({fewest:,} bytes at {choices[0]} bits)")
    if scan is None:
        fits = [b for b in choices if clustered_bytes(counts, dict.fromkeys(counts, b)) <= budget]
        return dict.fromkeys(counts, fits[-1])
    loss = {n: _bits_curve(scan[n], choices) for n in counts}
    while clustered_bytes(counts, bits) > budget:
        best, best_cost = None, math.inf
        for name, b in bits.items():
            i = choices.index(b)
            if i == 0:
                continue
            lower = choices[i - 1]
            saved = clustered_bytes(counts, {name: b}) - clustered_bytes(counts, {name: lower})
            cost = (loss[name][lower] - loss[name][b]) / max(saved, 1)
            if cost < best_cost:
                best, best_cost = name, cost
        bits[best] = choices[choices.index(bits[best]) - 1]
    return bits


def _bits_curve(points: list[tuple[int, float]], choices: list[int]) -> dict[int, float]:
    """Loss increase at every choice: interpolated between scanned bits (the nearest beyond
    them), clamped at ≥ 0 and made non-increasing in bits (fewer bits never help)."""
    xs = sorted((int(b), float(d)) for b, d in points)
    if not xs:
        raise KeyError("the scan has no bits points")
    out, level = {}, 0.0
    for b in sorted(choices, reverse=True):
        value = _interp(xs, b)
        level = max(level, value, 0.0)
        out[b] = level
    return out


def _interp(xs: list[tuple[int, float]], b: int) -> float:
    if b <= xs[0][0]:
        return xs[0][1]
    for (b0, d0), (b1, d1) in zip(xs, xs[1:]):
        if b0 <= b <= b1:
            return d0 + (b - b0) / (b1 - b0) * (d1 - d0)
    return xs[-1][1]


# -- k-means --------------------------------------------------------------------------------------


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars with linear initialisation; returns (centroids float64 sorted,
    assignment int64). Deterministic: same values, same result.

    In one dimension each cluster is a run of the sorted values between two midpoints, so an
    iteration is k binary searches and prefix-sum differences, not a pass over every value."""
    x = values.detach().reshape(-1).double().cpu()
    if x.numel() == 0:
        return torch.zeros(k, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    xs = x.sort().values
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), xs.cumsum(0)])
    centroids = torch.linspace(float(xs[0]), float(xs[-1]), k, dtype=torch.float64)
    ends = _run_ends(xs, centroids)
    for _ in range(iters):
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1]])
        counts = (ends - starts).double()
        sums = prefix[ends] - prefix[starts]
        # an empty cluster keeps its centroid (it stays a valid, unused code)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        centroids, _ = centroids.sort()
        new = _run_ends(xs, centroids)
        if torch.equal(new, ends):
            break
        ends = new
    return centroids, _nearest(x, centroids)


def _run_ends(sorted_x: torch.Tensor, sorted_centroids: torch.Tensor) -> torch.Tensor:
    """End (exclusive) in ``sorted_x`` of each centroid's members, as ``_nearest`` assigns them
    (a value on a midpoint goes to the lower centroid)."""
    mids = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    inner = torch.searchsorted(sorted_x, mids, right=True)
    return torch.cat([inner, torch.tensor([sorted_x.numel()])])


def _nearest(x: torch.Tensor, sorted_centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid: binary search on the midpoints between neighbours."""
    mids = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    return torch.bucketize(x, mids)


def cluster_weight(name: str, weight: torch.Tensor, bits: int, mask: torch.Tensor | None,
                   iters: int = 30) -> ClusteredLayer:
    """Cluster one weight tensor; pruned weights (mask False) get the fixed zero centroid 0."""
    k = 2 ** bits
    w = weight.detach().cpu()
    if mask is None:
        centroids, assign = kmeans_1d(w, k, iters)
        return ClusteredLayer(name, bits, assign.view(w.shape), centroids.float(), None)
    keep = mask.bool().cpu().reshape(-1)
    centroids, assign = kmeans_1d(w.reshape(-1)[keep], k - 1, iters)
    indices = torch.zeros(w.numel(), dtype=torch.int64)
    indices[keep] = assign + 1
    codebook = torch.cat([torch.zeros(1), centroids.float()])
    return ClusteredLayer(name, bits, indices.view(w.shape), codebook, 0)


def cluster_model(model: nn.Module, bits: Mapping[str, int], masks: Mapping[str, torch.Tensor],
                  iters: int = 30, quantize: Quantizer | None = None
                  ) -> dict[str, ClusteredLayer]:
    """Share every named weight's values through a codebook (``quantize``: ``cluster_weight``,
    k-means, by default) and write ``codebook[indices]`` into the model."""
    quantize = quantize or cluster_weight
    params = dict(model.named_parameters())
    layers = {}
    for name, b in bits.items():
        layer = quantize(name, params[name], b, masks.get(name), iters)
        with torch.no_grad():
            params[name].copy_(layer.weight().to(params[name].device, params[name].dtype))
        layers[name] = layer
    return layers


def first_member(indices: torch.Tensor, k: int) -> torch.Tensor:
    """Flat position of one member of each cluster (-1 for an empty cluster)."""
    flat = indices.reshape(-1)
    positions = torch.arange(flat.numel(), dtype=torch.int64)
    first = torch.full((k,), flat.numel(), dtype=torch.int64)
    first = first.scatter_reduce(0, flat, positions, reduce="amin")
    return torch.where(first == flat.numel(), torch.full_like(first, -1), first)


# -- centroid fine-tuning -------------------------------------------------------------------------


def centroid_gradient(grad: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """dL/dC_k = sum of dL/dW_i over the members i of cluster k."""
    flat = indices.reshape(-1).to(grad.device)
    return torch.zeros(k, dtype=grad.dtype, device=grad.device).index_add_(
        0, flat, grad.reshape(-1))


class CentroidHook(TrainHook):
    """Trains centroids instead of weights (see the module docstring). ``reduce='mean'`` divides
    each centroid's gradient by its member count, for learning rates on the per-weight scale."""

    def __init__(self, layers: dict[str, ClusteredLayer], reduce: str = "sum"):
        self.layers, self.reduce = layers, reduce
        self._params: dict[str, nn.Parameter] = {}
        self._handles: list[Any] = []
        self._counts: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer) -> None:
        self.attach(trainer.model)

    def attach(self, model: nn.Module) -> None:
        """Register the gradient hooks on ``model``'s clustered weights."""
        self.close()
        params = dict(model.named_parameters())
        for name, layer in self.layers.items():
            param = params[name]
            layer.indices = layer.indices.to(param.device)
            k = layer.codebook.numel()
            self._counts[name] = torch.bincount(layer.indices.reshape(-1), minlength=k).to(
                param.dtype)
            self._params[name] = param
            self._handles.append(param.register_hook(
                lambda grad, name=name: self.shared_gradient(name, grad)))
        self.project()

    def shared_gradient(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Every member's gradient becomes its centroid's (summed) gradient; on a uniform grid,
        its level times the step's gradient (see ``level_gradient``)."""
        layer = self.layers[name]
        if layer.levels is not None:
            return level_gradient(grad, layer, self.reduce)
        g = centroid_gradient(grad, layer.indices, layer.codebook.numel())
        if self.reduce == "mean":
            g = g / self._counts[name].to(g.device).clamp(min=1)
        if layer.zero_index is not None:
            g[layer.zero_index] = 0  # the pruned-weight centroid is exactly zero, always
        return g[layer.indices]

    def after_step(self, model: nn.Module, step: int) -> None:
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Read each centroid from one of its members and write codebook[indices] back."""
        for name, param in self._params.items():
            layer = self.layers[name]
            if layer.levels is not None:
                layer.codebook = _refit_grid(param, layer)
                param.copy_(layer.codebook.to(param.device, param.dtype)[layer.indices])
                continue
            reps = layer.representatives.to(param.device)
            used = reps >= 0
            values = param.reshape(-1)[reps.clamp(min=0)].detach().float().cpu()
            layer.codebook = torch.where(used.cpu(), values, layer.codebook)
            if layer.zero_index is not None:
                layer.codebook[layer.zero_index] = 0.0
            param.copy_(layer.codebook.to(param.device, param.dtype)[layer.indices])

    def close(self) -> None:
        """Remove the gradient hooks (the model trains normally again)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._params = [], {}


def level_gradient(grad: torch.Tensor, layer: ClusteredLayer, reduce: str) -> torch.Tensor:
    """Each weight's gradient on a uniform grid: its level times the step's gradient, which
    is dL/dstep = sum of level * dL/dW scaled as LSQ scales it (Esser et al., 2020: by
    1/sqrt(weights * top level), so that one learning rate suits any layer size and bit
    width); ``reduce='mean'`` divides by sum of level**2 instead (the least-squares
    projection of the weights' own gradient step)."""
    level = layer.levels.to(grad.device, grad.dtype)[layer.indices]
    g_step = (grad * level).sum()
    if reduce == "mean":
        g_step = g_step / level.square().sum().clamp(min=1)
    else:
        members = int((level != 0).sum())
        g_step = g_step / math.sqrt(max(members, 1) * int(layer.levels.max() - 1))
    return level * g_step


def _refit_grid(param: torch.Tensor, layer: ClusteredLayer) -> torch.Tensor:
    """The grid ``levels * step`` with the least-squares step for the weights after an
    optimizer step (exact for SGD, which moved each weight by its level times one amount)."""
    level = layer.levels.to(param.device, torch.float64)[layer.indices].reshape(-1)
    denom = float(level.square().sum())
    step = float((level * param.detach().reshape(-1).double()).sum()) / denom if denom else 0.0
    if step <= 0:  # the step would flip or vanish: keep the grid (a step stays positive)
        return layer.codebook
    return (layer.levels.double() * step).float()


# -- the artifact ---------------------------------------------------------------------------------


def index_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits <= 8 else torch.uint16


def store(artifact: Artifact, layers: dict[str, ClusteredLayer]) -> dict[str, Any]:
    """Write indices and codebooks into ``artifact.extras`` and describe them in ``quant``."""
    described, tensors = {}, {}
    for name, layer in layers.items():
        dtype = index_dtype(layer.bits)
        indices = layer.indices.cpu()
        tensors[name] = (indices.to(dtype), layer.codebook.float().cpu())
        counts = torch.bincount(indices.reshape(-1), minlength=layer.codebook.numel())
        described[name] = {
            "bits": layer.bits, "shape": list(indices.shape), "index_dtype": str(dtype)[6:],
            "zero_index": layer.zero_index, "used_centroids": int((counts > 0).sum()),
            "pruned": int(counts[0]) if layer.zero_index is not None else 0,
        }
        if layer.levels is not None:  # a uniform grid: say so, and its step
            step = float(layer.codebook[int(torch.argmax(layer.levels))]) / int(layer.levels.max())
            described[name].update(codebook="uniform", step=step)
    info = {"version": 1, "layers": described,
            "convention": "weight = codebook[indices]; codebook float32 of 2**bits entries; "
                          "zero_index 0 means codebook[0] == 0.0 holds exactly the pruned weights"}
    artifact_keys.set_cluster(artifact, info, tensors)
    return info


def load_layers(extras: Mapping[str, torch.Tensor], quant: Mapping[str, Any]
                ) -> dict[str, ClusteredLayer]:
    """The clustered layers an artifact describes (indices as int64)."""
    layers = {}
    for name, desc in quant.get(artifact_keys.CLUSTER, {}).get("layers", {}).items():
        try:
            indices, codebook = artifact_keys.cluster_tensors(extras, name)
        except KeyError as exc:
            raise CompressPipeError(f"cluster: extras lack {exc.args[0]!r} for {name}") from None
        if codebook.numel() != 2 ** desc["bits"]:
            raise CompressPipeError(f"cluster: codebook of {name} has {codebook.numel()} entries, "
                                    f"expected 2**{desc['bits']}")
        layers[name] = ClusteredLayer(name, desc["bits"], indices.to(torch.int64),
                                      codebook.float(), desc.get("zero_index"))
    return layers


def verify(model: nn.Module, layers: Mapping[str, ClusteredLayer],
           masks: Mapping[str, torch.Tensor]) -> None:
    """Raise unless every clustered weight equals codebook[indices] bit-exactly and the zero
    centroid holds exactly the pruned weights."""
    params = dict(model.named_parameters())
    for name, layer in layers.items():
        weight = params[name].detach().cpu()
        if not torch.equal(layer.weight().to(weight.dtype), weight):
            raise CompressPipeError(f"cluster: {name} is not equal to codebook[indices]")
        if name in masks:
            pruned = layer.indices.cpu() == layer.zero_index
            if not torch.equal(pruned, ~masks[name].bool().cpu()):
                raise CompressPipeError(f"cluster: zero centroid of {name} does not hold exactly "
                                        "its pruned weights")
            if layer.codebook[layer.zero_index] != 0:
                raise CompressPipeError(f"cluster: zero centroid of {name} is not 0.0")


def drop_stale(artifact: Artifact) -> list[str]:
    """Forget the weight sharing of layers whose weights no longer equal codebook[indices]
    (a stage after ``cluster`` retrained them); return their names.

    Stale indices would make the huffman stage code a model that is not the one evaluated."""
    if not artifact_keys.cluster_info(artifact):
        return []
    params = dict(artifact.model.named_parameters())
    stale = [name for name, layer in load_layers(artifact.extras, artifact.quant).items()
             if name not in params
             or not torch.equal(layer.weight().to(params[name].dtype), params[name].detach().cpu())]
    for name in stale:
        artifact_keys.drop_cluster_layer(artifact, name)
    return stale


# -- deployable form: indices + codebooks + the unclustered tensors ---------------------------------


def codebook_tensors(model: nn.Module, layers: Mapping[str, ClusteredLayer]
                     ) -> dict[str, torch.Tensor]:
    """What ``model.codebook.safetensors`` holds: every state tensor except the clustered
    weights, which are replaced by ``<name>.indices`` and ``<name>.codebook``."""
    out = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
           if k not in layers}
    for name, layer in layers.items():
        out[f"{name}.indices"] = layer.indices.cpu().to(index_dtype(layer.bits))
        out[f"{name}.codebook"] = layer.codebook.float().cpu()
    return out


def rebuild_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``codebook_tensors``: a plain state dict with weights = codebook[indices]."""
    state = {}
    for key, value in tensors.items():
        if key.endswith(".indices"):
            base = key.removesuffix(".indices")
            state[base] = tensors[f"{base}.codebook"][value.to(torch.int64)]
        elif not key.endswith(".codebook"):
            state[key] = value
    return state


@register_deploy_format(DEPLOY_FORMAT)
def load_codebook_model(directory: Path, artifact: Artifact) -> nn.Module:
    """Rebuild the model from the codebook file alone: the weights the runner evaluates."""

    files = (artifact.deploy or {}).get("files") or [CODEBOOK_FILE]
    model = build_from_spec(artifact.spec)
    try:
        model.load_state_dict(rebuild_state(load_file(str(Path(directory) / files[0]))))
    except (OSError, RuntimeError, KeyError) as exc:
        raise CompressPipeError(f"{directory / files[0]}: cannot rebuild the model: {exc}") from exc
    return model.eval()


def attach_deployable(artifact: Artifact, layers: Mapping[str, ClusteredLayer]) -> None:
    """Make the codebook file (uint8/uint16 indices + fp32 codebooks) the deployed model."""
    tensors = codebook_tensors(artifact.model, layers)
    artifact.outputs[CODEBOOK_FILE] = lambda path: save_file(tensors, str(path))
    artifact.deploy = {"format": DEPLOY_FORMAT, "files": [CODEBOOK_FILE], "module": __name__}
