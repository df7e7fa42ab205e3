"""MNIST-family data from idx files: parsing (numpy, no torchvision) and finding the files.

The idx format (LeCun's MNIST page): two zero bytes, a type byte (0x08 = unsigned byte), the
number of dimensions, then one big-endian uint32 per dimension and the values. Files may be
gzipped. We look in two layouts: the Debian packages' (``<root>/train-images-idx3-ubyte.gz``)
and torchvision's (``<root>/FashionMNIST/raw/...``), so that ``apt-get install
dataset-fashion-mnist`` or an earlier torchvision download both work as they are.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .errors import CompressPipeError

# Where the Debian packages install the files. Debian ships Fashion-MNIST only
# (dataset-fashion-mnist); no MNIST package exists, so that directory is a convention we
# also read, with the same file names.
DEBIAN_ROOTS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist"),
                "mnist": Path("/usr/share/datasets/mnist")}
TORCHVISION_DIRS = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST"}
INSTALL_HINT = {"fashion_mnist": "apt-get install dataset-fashion-mnist",
                "mnist": "put the four MNIST idx files there"}
SPLITS = {"train": "train", "test": "t10k"}
PARTS = {"images": "images-idx3-ubyte", "labels": "labels-idx1-ubyte"}
UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """The unsigned-byte array stored in the idx file ``path`` (gzipped or not).

    A file that is not idx, holds another element type, or whose size disagrees with its
    header is a ``CompressPipeError`` naming the file."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise CompressPipeError(f"{path}: cannot read idx data ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise CompressPipeError(f"{path}: not an idx file (bad magic number)")
    if raw[2] != UBYTE:
        raise CompressPipeError(f"{path}: idx element type 0x{raw[2]:02x}, expected unsigned "
                                "bytes (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise CompressPipeError(f"{path}: truncated idx header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise CompressPipeError(f"{path}: idx header says {'x'.join(map(str, dims))} = "
                                f"{expected} values, the file holds {len(raw) - header} "
                                "(truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def find_idx_files(name: str, root: Path | None) -> dict[str, Path]:
    """``{"train_images", "train_labels", "test_images", "test_labels"}`` -> file, from ``root``
    in the Debian or torchvision layout (``.gz`` or not), or from the Debian location when
    ``root`` is None. None found: one line saying how to get them."""
    found = _find(name, root)
    if found is None:
        raise CompressPipeError(f"data.root: {missing_message(name, root)}")
    return found


def missing_message(name: str, root: Path | None) -> str | None:
    """None when the files are there, else what is missing and how to get it (one line)."""
    if _find(name, root) is not None:
        return None
    where = root if root is not None else DEBIAN_ROOTS[name]
    if root is None:
        how = f"{INSTALL_HINT[name]}, or set data.root and data.download: true"
    else:
        how = "set data.download: true to download it there"
    return (f"no {name} idx files in {where} (Debian layout <dir>/train-images-idx3-ubyte.gz "
            f"or torchvision's <dir>/{TORCHVISION_DIRS[name]}/raw/); {how}")


def _find(name: str, root: Path | None) -> dict[str, Path] | None:
    base = root if root is not None else DEBIAN_ROOTS[name]
    for directory in (base, base / TORCHVISION_DIRS[name] / "raw"):
        files = _files_in(directory)
        if files is not None:
            return files
    return None


def _files_in(directory: Path) -> dict[str, Path] | None:
    """The four files in ``directory``, or None unless all four are there."""
    found = {}
    for split, prefix in SPLITS.items():
        for part, suffix in PARTS.items():
            stem = directory / f"{prefix}-{suffix}"
            path = next((p for p in (stem.with_name(stem.name + ".gz"), stem) if p.is_file()), None)
            if path is None:
                return None
            found[f"{split}_{part}"] = path
    return found


def load_idx_set(name: str, root: Path | None) -> dict[str, np.ndarray]:
    """Train and test images (N, H, W uint8) and labels (N,), checked against each other."""
    files = find_idx_files(name, root)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3:
            raise CompressPipeError(f"{files[f'{split}_images']}: expected images N x H x W, "
                                    f"got {images.ndim} dimensions")
        if labels.ndim != 1 or len(labels) != len(images):
            raise CompressPipeError(f"{files[f'{split}_labels']}: {labels.shape} labels for "
                                    f"{len(images)} images in {files[f'{split}_images']}")
        if labels.size and labels.max() >= 10:
            raise CompressPipeError(f"{files[f'{split}_labels']}: label {int(labels.max())} "
                                    "outside the 10 classes")
    return arrays
