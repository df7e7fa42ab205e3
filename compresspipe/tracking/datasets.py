"""Which data a run saw, as MLflow datasets: one record per split (train, validation, test) with
its source (the file the images come from, or the generator), a content checksum, its size and
a digest that changes when the split's contents do.

The runner logs these with ``Tracker.log_datasets`` (``mlflow.log_input``'s entities, context =
the split), so the MLflow UI's Dataset column tells two runs on different data apart. Digests
are computed once per run (source files once per process): hashing the tensors of an in-memory set or the
files of a torchvision set takes a fraction of a second, an image folder is hashed by its
listing (names and sizes), not by its contents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset, TensorDataset

from ..core.config import DataConfig
from ..core.data import DataBundle

SPLITS = ("train", "validation", "test")
DIGEST_CHARS = 16
CONTEXT_TAG = "mlflow.data.context"  # the tag MLflow's UI shows as the dataset's context

_FILE_SUMS: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class DatasetRecord:
    """One split of the pipeline's data as MLflow shows it."""

    name: str  # the dataset ('digits', 'fashion_mnist', ...)
    split: str  # train / validation / test: the input's context
    digest: str  # of the split's contents, as selected (subsets, preprocessing size)
    source_type: str  # MLflow source type: 'local' (files) or 'code' (generated)
    source: dict[str, Any]
    size: int
    shape: tuple[int, ...]  # one image, (C, H, W)
    profile: dict[str, Any] = field(default_factory=dict)

    def entity(self):
        """The ``mlflow.entities.Dataset`` that ``log_inputs`` takes."""
        # lazy: importing mlflow takes seconds; untracked runs never pay for it
        import numpy as np
        from mlflow.data.schema import TensorDatasetSchema
        from mlflow.entities import Dataset as MlflowDataset
        from mlflow.types.schema import Schema, TensorSpec

        schema = TensorDatasetSchema(
            features=Schema([TensorSpec(np.dtype("float32"), (-1, *self.shape), "images")]),
            targets=Schema([TensorSpec(np.dtype("int64"), (-1,), "labels")]))
        return MlflowDataset(name=self.name, digest=self.digest, source_type=self.source_type,
                             source=json.dumps(self.source), schema=json.dumps(schema.to_dict()),
                             profile=json.dumps({"num_rows": self.size, "split": self.split,
                                                 **self.profile}))


def describe_data(bundle: DataBundle) -> dict[str, DatasetRecord]:
    """{split: record} for the splits ``bundle`` has (validation only where it has one)."""
    sets = {"train": bundle.train, "validation": getattr(bundle, "val", None),
            "test": bundle.test}
    cfg = bundle.config
    source_type, source, checksum = _source(cfg, bundle.train)
    records = {}
    for split, ds in sets.items():
        if ds is None:
            continue
        base, indices = _unwrap(ds)
        content = _tensor_sum(base) if isinstance(base, TensorDataset) else checksum
        digest = _sha256(json.dumps([content, split, indices, len(ds), cfg.image_size,
                                     cfg.dataset_channels()]).encode())[:DIGEST_CHARS]
        records[split] = DatasetRecord(
            name=cfg.name, split=split, digest=digest, source_type=source_type, source=source,
            size=len(ds), shape=(bundle.in_chans, bundle.image_size, bundle.image_size),
            profile={"source_sha256": checksum, "num_classes": bundle.num_classes,
                     "content_sha256": content})
    return records


def _source(cfg: DataConfig, train: Dataset) -> tuple[str, dict[str, Any], str]:
    """(MLflow source type, source, sha256 of what the data is read from)."""
    if cfg.name == "digits":
        # lazy: scikit-learn loads only for the digits dataset
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
        return "local", {"uri": str(path)}, \
            _file_sum(path)
    if cfg.name == "fake":
        generator = {"generator": "compresspipe.core.data fake", "seed": "1234",
                     "train_size": str(cfg.train_size), "test_size": str(cfg.test_size)}
        return "code", {"tags": generator}, _sha256(json.dumps(generator).encode())
    base, _ = _unwrap(train)
    if cfg.name == "imagefolder":
        root = Path(cfg.root or ".").resolve()
        listing = [(str(Path(p).resolve().relative_to(root)), Path(p).stat().st_size)
                   for p, _ in getattr(base, "samples", [])]
        return "local", {"uri": str(root)}, _sha256(json.dumps(listing).encode())
    folder = Path(getattr(base, "raw_folder", None) or Path(str(cfg.root or ".")))
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return "local", {"uri": str(folder.resolve())}, \
        _sha256(json.dumps([[p.name, _file_sum(p)] for p in files]).encode())


def _unwrap(ds: Dataset) -> tuple[Dataset, list[int] | None]:
    """The dataset under subsets and augmentation wrappers, and the indices selected from it."""
    indices: list[int] | None = None
    while True:
        if isinstance(ds, Subset):
            picked = [int(i) for i in ds.indices]
            indices = picked if indices is None else [picked[i] for i in indices]
            ds = ds.dataset
        elif isinstance(getattr(ds, "base", None), Dataset):  # ShiftAugment and the like
            ds = ds.base
        else:
            return ds, indices


def _tensor_sum(ds: TensorDataset) -> str:
    h = hashlib.sha256()
    for t in ds.tensors:
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _file_sum(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_SUMS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_SUMS[key] = h.hexdigest()
    return _FILE_SUMS[key]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
