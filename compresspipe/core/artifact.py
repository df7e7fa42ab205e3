"""The shared model artifact every stage takes and returns, and its on-disk form.

On disk (no pickle anywhere): ``artifact.json`` (spec, lineage, quantization state, metadata),
``model.safetensors`` (weights), ``masks.safetensors`` and ``extras.safetensors`` when present;
``metrics.json`` is written after the artifact was measured.
Saved with a :class:`~compresspipe.core.store.TensorStore`, the three tensor files are replaced
by ``tensors.json``: the store's place and the content hash of every tensor, which the store
holds once however many artifacts name it (the runner saves this way; see core/store.py).
Directories are written to a temporary sibling and renamed into place, so a crash never leaves a
half-written artifact.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .errors import ArtifactError
from .models import build_from_saved_spec
from .store import TensorStore

FORMAT_VERSION = 1
META_FILE = "artifact.json"
MODEL_FILE = "model.safetensors"
MASKS_FILE = "masks.safetensors"
EXTRAS_FILE = "extras.safetensors"
TENSORS_FILE = "tensors.json"  # instead of the three above: pointers into a tensor store
METRICS_FILE = "metrics.json"  # measured after saving; a report about the artifact, not part of it


@dataclass
class Artifact:
    """A model plus everything later stages and deployment need to know about it."""

    model: nn.Module
    spec: dict[str, Any]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    quant: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    lineage: list[dict[str, Any]] = field(default_factory=list)
    # What the current stage produced besides the weights. Both describe one stage's output and
    # are cleared by the runner once saved, so a later stage never re-emits a stale file.
    outputs: dict[str, Callable[[Path], None]] = field(default_factory=dict, repr=False)
    # {"format": name, "files": [...], "module": "compresspipe.x" that registers the format};
    # None means model.safetensors is the deployable model
    deploy: dict[str, Any] | None = None

    def model_files(self) -> list[str]:
        """Files that *are* the deployable model (what size metrics measure)."""
        return list(self.deploy["files"]) if self.deploy else [MODEL_FILE]

    def deployed_model(self, directory: str | os.PathLike) -> nn.Module:
        """The model as it will run, rebuilt from the deployable files in ``directory``
        (e.g. the int8 program or the model decoded from a .cpz), in eval mode."""
        if not self.deploy:
            return self.model.eval()
        fmt = self.deploy["format"]
        module = str(self.deploy.get("module", ""))
        module = _MOVED_MODULES.get(module, module)
        if fmt not in _DEPLOY_LOADERS and module.startswith("compresspipe."):
            # the module that registers the format is imported by name so that this layer does
            # not import the layers above it; only our own modules: artifact metadata must
            # never choose code to import
            importlib.import_module(module)
        if fmt not in _DEPLOY_LOADERS:
            raise ArtifactError(f"{directory}: unknown deploy format {fmt!r}")
        return _DEPLOY_LOADERS[fmt](Path(directory), self).eval()

    def save(self, directory: str | os.PathLike,
             store: TensorStore | None = None) -> dict[str, int]:
        """Write atomically to ``directory`` (the tensors into ``store`` when given, each
        once); return {file name: bytes on disk} of the directory's files."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide results from other users
        try:
            self._write_files(tmp, store)
            _replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if store is not None:
            store.add_ref(directory / TENSORS_FILE)
        return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}

    def _write_files(self, tmp: Path, store: TensorStore | None) -> None:
        self.model.cpu()
        masks = {k: v.contiguous().cpu().bool() for k, v in self.masks.items()}
        extras = {k: v.contiguous().cpu() for k, v in self.extras.items()}
        if store is not None:
            write_json(tmp / TENSORS_FILE, {"store": str(store.root), "tensors": {
                "model": store.put_all(self.model.state_dict()),
                "masks": store.put_all(masks), "extras": store.put_all(extras)}})
        else:
            save_model(self.model, str(tmp / MODEL_FILE), metadata={"format": "compresspipe"})
            if masks:
                save_file(masks, str(tmp / MASKS_FILE))
            if extras:
                save_file(extras, str(tmp / EXTRAS_FILE))
        write_json(tmp / META_FILE, self.to_json())
        for name, write in self.outputs.items():
            if not _plain_file_name(name) or name in (META_FILE, MODEL_FILE, MASKS_FILE,
                                                      EXTRAS_FILE, TENSORS_FILE):
                raise ArtifactError(f"invalid artifact output file name {name!r}")
            write(tmp / name)
        for p in tmp.iterdir():
            _fsync(p)

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "spec": self.spec,
            "quant": self.quant,
            "meta": self.meta,
            "lineage": self.lineage,
            "masks": sorted(self.masks),
            "deploy": self.deploy,
        }

    def write_metrics(self, directory: str | os.PathLike, metrics: dict[str, Any]) -> None:
        """Record the measured metrics of this artifact beside it (and in its lineage)."""
        if self.lineage:
            self.lineage[-1]["metrics"] = metrics
        write_json(Path(directory) / METRICS_FILE, metrics)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Artifact:
        """Rebuild the model from its spec and load its tensors; no pickle involved."""

        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise ArtifactError(f"{directory}: not an artifact (no {META_FILE})")
        try:
            info = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{meta_path}: unreadable ({exc})") from exc
        if not isinstance(info, dict):
            raise ArtifactError(f"{meta_path}: not a JSON object")
        version = info.get("format_version")
        if version != FORMAT_VERSION:
            raise ArtifactError(f"{meta_path}: format version {version!r}, "
                                f"this compresspipe reads {FORMAT_VERSION}")
        deploy = info.get("deploy")
        if deploy is not None and not (
                isinstance(deploy, dict) and isinstance(deploy.get("format"), str)
                and isinstance(deploy.get("files"), list) and deploy["files"]
                and all(_plain_file_name(f) for f in deploy["files"])):
            # the deployable files are read from this directory, never from elsewhere
            raise ArtifactError(f"{meta_path}: invalid 'deploy' entry {str(deploy)[:120]}")
        if (directory / TENSORS_FILE).is_file():
            model, masks, extras = _load_from_store(directory / TENSORS_FILE, info, meta_path)
        else:
            model, masks, extras = _load_files(directory, info, meta_path)
        model.eval()
        if sorted(masks) != sorted(info.get("masks", [])):
            raise ArtifactError(f"{directory / MASKS_FILE}: masks do not match {META_FILE}")
        lineage = info.get("lineage", [])
        if lineage and (directory / METRICS_FILE).is_file():
            lineage[-1]["metrics"] = json.loads((directory / METRICS_FILE).read_text())
        return cls(
            model=model, spec=info["spec"], masks=masks, quant=info.get("quant", {}),
            extras=extras,
            meta=info.get("meta", {}), lineage=lineage, deploy=deploy,
        )


# where the modules that register deploy formats lived before the package was layered (0.1.0
# artifacts name them)
_MOVED_MODULES = {
    "compresspipe.cpz_model": "compresspipe.formats.cpz_model",
    "compresspipe.quantization.cluster": "compresspipe.compress.quant.cluster",
    "compresspipe.quantization.onnx_int8": "compresspipe.compress.quant.onnx_int8",
}

_DEPLOY_LOADERS: dict[str, Callable[[Path, Artifact], nn.Module]] = {}


def register_deploy_format(name: str):
    """Decorator: ``fn(directory, artifact) -> nn.Module`` rebuilds a deployable model format."""

    def wrap(fn: Callable[[Path, Artifact], nn.Module]):
        _DEPLOY_LOADERS[name] = fn
        return fn

    return wrap


def _load_files(directory: Path, info: dict, meta_path: Path):
    """Model, masks and extras from the directory's safetensors files."""
    model = build_from_saved_spec(info.get("spec"), str(meta_path),
                                  file_elements=_file_elements(directory / MODEL_FILE))
    try:
        missing, unexpected = load_model(model, str(directory / MODEL_FILE), strict=False)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ArtifactError(f"{directory / MODEL_FILE}: {exc}") from exc
    _check_keys(directory / MODEL_FILE, missing, unexpected)
    return (model, _load_optional(load_file, directory / MASKS_FILE),
            _load_optional(load_file, directory / EXTRAS_FILE))


def _load_from_store(path: Path, info: dict, meta_path: Path):
    """Model, masks and extras from the tensor store a ``tensors.json`` points to."""
    try:
        manifest = json.loads(path.read_text())
        groups = manifest["tensors"]
        store = TensorStore(manifest["store"])
        if not all(isinstance(groups.get(g, {}), dict) for g in ("model", "masks", "extras")):
            raise TypeError("tensor groups are not mappings")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: unreadable tensor manifest ({exc})") from exc
    state = store.get_all(groups.get("model", {}))
    model = build_from_saved_spec(info.get("spec"), str(meta_path),
                                  file_elements=sum(t.numel() for t in state.values()))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError) as exc:
        raise ArtifactError(f"{path}: {exc}") from exc
    _check_keys(path, missing, unexpected)
    return model, store.get_all(groups.get("masks", {})), store.get_all(groups.get("extras", {}))


def _check_keys(where: Path, missing, unexpected) -> None:
    if missing or unexpected:
        raise ArtifactError(f"{where}: does not match the spec "
                            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")


def is_artifact(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a saved artifact (in either form)."""
    directory = Path(directory)
    return (directory / META_FILE).is_file() and (
        (directory / MODEL_FILE).is_file() or (directory / TENSORS_FILE).is_file())


def _load_optional(load_file, path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path)) if path.is_file() else {}


def _file_elements(path: Path) -> int | None:
    """Tensor elements a safetensors file holds, from its header alone (None if unreadable)."""
    try:
        with safe_open(str(path), "pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    except Exception:  # noqa: BLE001 - the weights load below reports what is wrong
        return None


def _plain_file_name(name: object) -> bool:
    """A file directly inside the artifact directory: no separators, not '', '.' or '..'."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and Path(name).name == name)


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write: temporary file in the same directory, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _replace_dir(new: Path, target: Path) -> None:
    """Swap ``new`` into ``target``; an old target is moved aside first, then deleted."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
