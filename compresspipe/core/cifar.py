"""CIFAR-10 / CIFAR-100 from their binary version: parsing (numpy) and finding the files.

The binary version (Krizhevsky's page, "suitable for C programs") is fixed-length records: the
label byte(s) then 3,072 pixel bytes, the red, green and blue 32×32 planes in that order.
CIFAR-10 has one label byte per record, in ``cifar-10-batches-bin/data_batch_{1..5}.bin`` and
``test_batch.bin``; CIFAR-100 two (coarse, then the fine label we train on) in
``cifar-100-binary/{train,test}.bin``. The Python version that torchvision downloads is
pickles, which compresspipe never opens: a root holding only that version is refused with a
message saying how to get the binary one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CompressPipeError

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant's binary files live and how its records are laid out."""

    archive_url: str
    archive_md5: str
    directory: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int  # the label we use is the last of them
    classes: int
    pickle_directory: str  # the Python version's directory, recognised to explain the refusal


LAYOUTS = {
    "cifar10": CifarLayout(
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-batches-bin",
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",), 1, 10,
        "cifar-10-batches-py"),
    "cifar100": CifarLayout(
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        "03b5dce01913d631647c71ecec9e9cb8", "cifar-100-binary", ("train.bin",), ("test.bin",),
        2, 100, "cifar-100-python"),
}


def read_records(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one binary file.

    A size that is not a whole number of records, or a label outside the classes, is a
    ``CompressPipeError`` naming the file."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise CompressPipeError(f"{path}: cannot read CIFAR data ({exc})") from exc
    record = layout.label_bytes + PIXELS
    if raw.size == 0 or raw.size % record:
        raise CompressPipeError(f"{path}: {raw.size} bytes is not a whole number of "
                                f"{record}-byte {layout.directory} records (truncated, or "
                                "not the binary version)")
    rows = raw.reshape(-1, record)
    labels = rows[:, layout.label_bytes - 1].astype(np.int64)
    if labels.max() >= layout.classes:
        row = int(np.argmax(labels >= layout.classes))
        raise CompressPipeError(f"{path}: record {row} has label {int(labels[row])}, outside "
                                f"the {layout.classes} classes")
    return rows[:, layout.label_bytes:].reshape(-1, 3, 32, 32), labels


def find_directory(name: str, root: Path) -> Path:
    """The directory holding ``name``'s binary files: ``root`` itself or its standard
    sub-directory. Missing: one line saying what was looked for and how to get it."""
    message = missing_message(name, root)
    if message is not None:
        raise CompressPipeError(f"data.root: {message}")
    layout = LAYOUTS[name]
    return next(d for d in (root / layout.directory, root) if _complete(d, layout))


def missing_message(name: str, root: Path) -> str | None:
    """None when the binary files are there, else what is missing and how to get it."""
    layout = LAYOUTS[name]
    if any(_complete(d, layout) for d in (root / layout.directory, root)):
        return None
    files = ", ".join(layout.train_files + layout.test_files)
    found_pickles = (root / layout.pickle_directory).is_dir()
    why = (f"{root / layout.pickle_directory} is CIFAR's Python-pickle version, which "
           "compresspipe does not open; " if found_pickles else "")
    return (f"no {name} binary files in {root / layout.directory} ({files}); {why}set "
            f"data.download: true, or unpack {layout.archive_url.rsplit('/', 1)[1]} "
            f"(the binary version, {layout.archive_url}) into {root}")


def load_cifar_set(name: str, root: Path) -> dict[str, np.ndarray]:
    """Train and test images (N, 3, 32, 32 uint8) and labels (N,) from ``root``."""
    layout = LAYOUTS[name]
    directory = find_directory(name, root)
    arrays = {}
    for split, files in (("train", layout.train_files), ("test", layout.test_files)):
        parts = [read_records(directory / f, layout) for f in files]
        arrays[f"{split}_images"] = np.concatenate([p[0] for p in parts])
        arrays[f"{split}_labels"] = np.concatenate([p[1] for p in parts])
    return arrays


def _complete(directory: Path, layout: CifarLayout) -> bool:
    return all((directory / f).is_file() for f in layout.train_files + layout.test_files)
