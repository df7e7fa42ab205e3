"""Building networks: timm names, Python factories, checkpoints; and rebuilding them from a spec.

A *spec* is the JSON-able recipe that rebuilds the architecture (never pickled code):
``{"source": "timm", "name": "resnet18", "kwargs": {...}}`` or
``{"source": "factory", "factory": "pkg.mod:fn", "kwargs": {...}}``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .config import DataConfig, ModelConfig
from .errors import ArtifactError, CompressPipeError
from .structure import apply_structure

# Factories a pipeline file (or the caller, through allow_factory) named in this process. A spec
# read back from artifact.json or .cpz metadata may only use these: metadata must never choose
# code to import.
_NAMED_FACTORIES: set[str] = set()


def allow_factory(path: str) -> None:
    """Trust the model factory ``'pkg.mod:fn'``: specs naming it may now import and call it."""
    _NAMED_FACTORIES.add(path)


def allow_named_factories(raw: Any) -> None:
    """Trust every ``factory:`` a pipeline file names (the model's, a student's)."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            if key == "factory" and isinstance(value, str):
                allow_factory(value)
            else:
                allow_named_factories(value)
    elif isinstance(raw, list):
        for value in raw:
            allow_named_factories(value)


def model_spec(model_cfg: ModelConfig, data_cfg: DataConfig) -> dict[str, Any]:
    """The spec for ``model_cfg``, with in_chans/num_classes defaulted from the dataset."""
    kwargs = dict(model_cfg.kwargs)
    kwargs.setdefault("in_chans", data_cfg.dataset_channels())
    classes = data_cfg.dataset_num_classes()
    if classes is None and data_cfg.root is not None:
        classes = count_imagefolder_classes(data_cfg.root)
    if classes is not None:
        kwargs.setdefault("num_classes", classes)
    if model_cfg.name is not None:
        return {"source": "timm", "name": model_cfg.name, "kwargs": kwargs}
    allow_factory(model_cfg.factory)  # a ModelConfig is what a pipeline file says
    return {"source": "factory", "factory": model_cfg.factory, "kwargs": kwargs}


def count_imagefolder_classes(root: Path) -> int | None:
    """Class directories under ``root/train`` (None without that directory)."""
    train = Path(root) / "train"
    if not train.is_dir():
        return None
    return sum(1 for p in train.iterdir() if p.is_dir())


def build_from_spec(spec: dict[str, Any], pretrained: bool = False) -> nn.Module:
    """Instantiate the architecture a spec describes (random or hub weights).

    A spec with a ``structure`` entry (written by structured pruning) describes a network whose
    layers were narrowed; it is rebuilt from the base architecture, never unpickled.
    """
    model = _build_base(spec, pretrained)
    if spec.get("structure"):
        apply_structure(model, spec["structure"])
    return model


# timm.create_model arguments that read files or fetch weights
_LOADING_KWARGS = frozenset({"checkpoint_path", "pretrained", "pretrained_cfg",
                             "pretrained_cfg_overlay", "cache_dir"})


def build_from_saved_spec(spec: Any, where: str, file_elements: int | None = None) -> nn.Module:
    """``build_from_spec`` for a spec read back from a file (artifact.json, .cpz metadata):
    whatever is wrong with it is an ArtifactError naming ``where``.

    ``file_elements`` (the tensor elements the file holds) bounds the model: it is first built
    on the meta device, so a spec asking for billions of parameters allocates nothing."""
    if not (isinstance(spec, dict) and spec.get("source") in ("timm", "factory")
            and isinstance(spec.get("kwargs", {}), dict)
            and all(isinstance(k, str) for k in spec.get("kwargs", {}))):
        raise ArtifactError(f"{where}: invalid model spec {str(spec)[:120]}")
    loaders = sorted(set(spec.get("kwargs", {})) & _LOADING_KWARGS)
    if loaders:  # the weights come from this file, never from one its metadata names
        raise ArtifactError(f"{where}: the model spec may not set {', '.join(loaders)}")
    if file_elements is not None:
        try:
            with torch.device("meta"):
                needed = sum(t.numel() for t in build_from_spec(spec).state_dict().values())
        except Exception:  # noqa: BLE001 - some models cannot be built on meta; the real build decides
            needed = 0
        # the model's state is in the file, but for a few vectors a decoder may recreate
        if needed > 2 * file_elements + 1_000_000:
            raise ArtifactError(f"{where}: the model spec describes {needed:,} parameters and "
                                f"buffers, the file holds {file_elements:,}")
    try:
        return build_from_spec(spec)
    except CompressPipeError as exc:
        raise ArtifactError(f"{where}: {exc}") from exc
    except (TypeError, ValueError, RuntimeError, AssertionError, KeyError, AttributeError,
            IndexError, OverflowError, MemoryError) as exc:
        raise ArtifactError(f"{where}: cannot rebuild the model from its spec "
                            f"({type(exc).__name__}: {str(exc)[:200]})") from exc


def _build_base(spec: dict[str, Any], pretrained: bool) -> nn.Module:
    kwargs = dict(spec.get("kwargs", {}))
    if spec["source"] == "timm":
        import timm  # lazy: importing timm takes seconds; only model building needs it

        return timm.create_model(spec["name"], pretrained=pretrained, **kwargs)
    if spec["source"] == "factory":
        if spec.get("factory") not in _NAMED_FACTORIES:
            raise CompressPipeError(
                f"the model spec names the Python factory {spec.get('factory')!r}, which no "
                "pipeline file in this process names; code named by saved metadata is never "
                "imported (call compresspipe.core.models.allow_factory() with it if you trust it)")
        fn = import_factory(spec["factory"])
        model = fn(**kwargs)
        if not isinstance(model, nn.Module):
            raise CompressPipeError(
                f"factory {spec['factory']!r} returned {type(model).__name__}, not an nn.Module"
            )
        return model
    raise CompressPipeError(f"unknown model source {spec['source']!r}")


def import_factory(path: str):
    """Import 'pkg.mod:fn' — only ever called because the pipeline file names it."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CompressPipeError(f"cannot import model factory module {module_name!r}: {exc}") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise CompressPipeError(f"{path!r}: {module_name} has no callable {attr!r}")
    return fn


def build_model(model_cfg: ModelConfig, data_cfg: DataConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The pipeline's starting model and its spec; loads the checkpoint if one is given."""
    spec = model_spec(model_cfg, data_cfg)
    model = build_from_spec(spec, pretrained=model_cfg.pretrained)
    if model_cfg.checkpoint is not None:
        load_weights(model, read_checkpoint(model_cfg.checkpoint), str(model_cfg.checkpoint))
    return model, spec


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a state dict; never unpickles arbitrary objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:
            raise CompressPipeError(f"{path}: not a valid safetensors file ({exc})") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CompressPipeError(
            f"{path}: cannot load as a weights-only state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]})"
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CompressPipeError(f"{path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def weight_mismatches(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    """What keeps ``tensors`` from loading strictly into ``model``: missing and unexpected
    names, tensors of another shape; [] when they fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    parts = []
    if missing:
        parts.append(f"missing {_few(missing)}")
    if unexpected:
        parts.append(f"unexpected {_few(unexpected)}")
    shapes = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
    parts += [f"tensor {k!r} has shape {list(tensors[k].shape)}, the model expects "
              f"{list(own[k].shape)}" for k in shapes[:4]]
    if len(shapes) > 4:
        parts.append(f"and {len(shapes) - 4} more tensors of another shape")
    return parts


def load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Strict load with an error that names the offending tensors."""
    mismatches = weight_mismatches(model, tensors)
    if mismatches:
        raise CompressPipeError(f"{where}: weights do not match the model: "
                                f"{'; '.join(mismatches)}")
    model.load_state_dict(tensors, strict=True)


def _few(names: list[str], n: int = 4) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
