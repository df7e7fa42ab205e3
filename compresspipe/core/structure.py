"""A narrowed network as JSON, and its replay on a freshly built base model.

Structured pruning physically narrows layers. ``describe_structure`` records, relative to the
base architecture built from the same spec, the width of every changed layer, the shape of every
changed loose parameter and the head count of every changed attention layer (stored as
``spec["structure"]``). ``apply_structure`` replays that description on the base model so that
the saved safetensors load strictly: building a model from its spec needs nothing pickled.

Also here, because the replay needs them: the layer kinds structured pruning narrows
(``CONV``, ``BATCHNORM``, ``widths``) and the attention layers whose heads it can follow
(``find_attention``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import CompressPipeError

STRUCTURE_VERSION = 1

BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class AttentionInfo:
    """A timm-style multi-head attention: qkv -> heads -> proj, shapes from its attributes."""

    name: str
    module: nn.Module

    @property
    def heads(self) -> int:
        return int(self.module.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.module.head_dim)

    def set_heads(self, heads: int) -> None:
        """Keep the attributes the forward pass reshapes with in step with the pruned weights."""
        self.module.num_heads = heads
        if hasattr(self.module, "attn_dim"):
            self.module.attn_dim = heads * self.head_dim


def find_attention(model: nn.Module) -> tuple[dict[str, AttentionInfo], dict[str, str]]:
    """Attention layers whose heads can be removed, and {name: reason} for those that cannot.

    Supported: ``qkv`` and ``proj`` Linear layers with ``num_heads``/``head_dim`` attributes
    that match their shapes (timm's Attention). Anything else with ``num_heads`` reshapes by
    head count in code we cannot see, so its width must not change.
    """
    supported, unsupported = {}, {}
    for name, m in model.named_modules():
        if not hasattr(m, "num_heads") or not name:
            continue
        qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
        heads, head_dim = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
        norms = [getattr(m, k, None) for k in ("q_norm", "k_norm")]
        ok = (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
              and isinstance(heads, int) and isinstance(head_dim, int)
              and qkv.out_features == 3 * heads * head_dim
              and proj.in_features == heads * head_dim
              and all(n is None or isinstance(n, nn.Identity) for n in norms))
        if ok:
            supported[name] = AttentionInfo(name, m)
        else:
            unsupported[name] = type(m).__name__
    return supported, unsupported


def widths(module: nn.Module) -> dict[str, int] | None:
    """In/out widths of a layer kind that structured pruning narrows."""
    if isinstance(module, CONV):
        return {"in": module.in_channels, "out": module.out_channels, "groups": module.groups}
    if isinstance(module, nn.Linear):
        return {"in": module.in_features, "out": module.out_features}
    if isinstance(module, BATCHNORM):
        return {"out": module.num_features}
    if isinstance(module, nn.LayerNorm):
        return {"out": int(module.normalized_shape[-1])}
    if isinstance(module, nn.GroupNorm):
        return {"out": module.num_channels}
    return None


def describe_structure(model: nn.Module, base: nn.Module) -> dict[str, Any]:
    """JSON description of how ``model`` is narrower than ``base`` (same architecture built
    from the spec): widths of changed layers, shapes of changed loose parameters, head counts."""
    base_modules = dict(base.named_modules())
    layers: dict[str, dict[str, int]] = {}
    attention: dict[str, dict[str, int]] = {}
    wrapped: set[str] = set()
    for name, m in model.named_modules():
        now = widths(m)
        if now is not None:
            wrapped.update(f"{name}.{p}" if name else p for p, _ in m.named_parameters(recurse=False))
            then = widths(base_modules[name]) if name in base_modules else None
            if then is None or type(base_modules[name]) is not type(m):
                raise CompressPipeError(f"layer {name!r} is not in the base architecture")
            if now != then:
                layers[name] = {k: v for k, v in now.items() if k != "groups"}
        if (hasattr(m, "num_heads") and name in base_modules
                and getattr(base_modules[name], "num_heads", None) != m.num_heads):
            attention[name] = {"num_heads": int(m.num_heads)}
    base_params = dict(base.named_parameters())
    parameters = {n: list(p.shape) for n, p in model.named_parameters()
                  if n not in wrapped and n in base_params and p.shape != base_params[n].shape}
    return {"version": STRUCTURE_VERSION, "layers": layers, "parameters": parameters,
            "attention": attention}


def apply_structure(model: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Narrow a freshly built base model in place to the described widths (values are not
    kept: the weights are loaded afterwards). Raises CompressPipeError naming the layer when
    the description does not fit the model."""
    import torch_pruning as tp  # lazy: seconds to import, and only narrowed specs need it

    version = structure.get("version")
    if version != STRUCTURE_VERSION:
        raise CompressPipeError(f"structure: version {version!r}, this compresspipe reads "
                                f"{STRUCTURE_VERSION}")
    modules = dict(model.named_modules())
    supported, _ = find_attention(model)  # before narrowing: it checks qkv against num_heads
    registry = tp.DependencyGraph()  # only its registry of per-layer pruning functions
    for name, want in structure.get("layers", {}).items():
        m = modules.get(name)
        if m is None or widths(m) is None:
            raise CompressPipeError(f"structure: layer {name!r} is not a prunable layer of "
                                    f"{type(model).__name__}")
        pruner = registry.get_pruner_of_module(m)
        for direction in ("out", "in"):
            if direction not in want:
                continue
            have = widths(m)[direction]
            if want[direction] > have or want[direction] < 1:
                raise CompressPipeError(f"structure: layer {name!r} has {have} {direction}put "
                                        f"channels, cannot narrow to {want[direction]}")
            if want[direction] < have:
                fn = pruner.prune_out_channels if direction == "out" else pruner.prune_in_channels
                fn(m, list(range(want[direction], have)))
        got = {k: v for k, v in widths(m).items() if k in want}
        if got != want:
            raise CompressPipeError(f"structure: layer {name!r} became {got}, expected {want}")
    params = dict(model.named_parameters())
    for name, shape in structure.get("parameters", {}).items():
        if name not in params:
            raise CompressPipeError(f"structure: parameter {name!r} is not in the model")
        p = params[name]
        if len(shape) != p.dim() or any(s > h for s, h in zip(shape, p.shape, strict=True)):
            raise CompressPipeError(f"structure: parameter {name!r} of shape {list(p.shape)} "
                                    f"cannot become {shape}")
        parent_name, _, leaf = name.rpartition(".")
        narrowed = p.detach()[tuple(slice(0, s) for s in shape)].clone()
        setattr(modules[parent_name], leaf, nn.Parameter(narrowed, requires_grad=p.requires_grad))
    for name, attrs in structure.get("attention", {}).items():
        m = modules.get(name)
        if m is None or not hasattr(m, "num_heads"):
            raise CompressPipeError(f"structure: {name!r} is not an attention layer")
        if name in supported:
            supported[name].set_heads(int(attrs["num_heads"]))
        else:
            m.num_heads = int(attrs["num_heads"])
    return model
