"""The built-in data sets: each builder returns its training pool, test set and class count.

In-memory sets (digits, fake, the MNIST family, CIFAR) come back as ``InMemoryImages``: their
batches are prepared with tensor ops by ``batches.BatchLoader``. Image folders stay
torchvision datasets with per-image transforms (read from disk by DataLoader workers).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from . import cifar
from .batches import Augment, InMemoryImages, Prepare
from .config import DataConfig
from .errors import CompressPipeError
from .idx import TORCHVISION_DIRS, load_idx_set

# Fixed so that every run, on every machine, evaluates on the same 360 digits.
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


@dataclass
class Sets:
    """A builder's result. ``plain`` is ``train`` without augmentation (same images, same
    order): the validation split is taken from it."""

    train: Dataset
    plain: Dataset
    test: Dataset
    num_classes: int


def build_sets(cfg: DataConfig) -> Sets:
    builders = {"digits": _digits, "fake": _fake, "imagefolder": _imagefolder,
                "mnist": _idx, "fashion_mnist": _idx, "cifar10": _cifar, "cifar100": _cifar}
    return builders[cfg.name](cfg)


def _in_memory(train: InMemoryImages, test: InMemoryImages, classes: int) -> Sets:
    plain = InMemoryImages(train.images, train.labels, train.prepare, None)  # shares storage
    return Sets(train, plain, test, classes)


def _ready_images(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """(N, C, h, w) in [0, 1] -> resized, normalised, with the configured channel count."""
    return Prepare(size=cfg.image_size, channels=cfg.dataset_channels(), normalize=True)(x)


def _shift(cfg: DataConfig) -> Augment | None:
    """Digits and fake data: translation by up to 1/8 of the side, edges replicated; no flips
    (a mirrored digit is a different symbol)."""
    return Augment(max(1, cfg.image_size // 8), "replicate") if cfg.augment else None


def _digits(cfg: DataConfig) -> Sets:
    from sklearn.datasets import load_digits  # lazy: scikit-learn loads only for the digits dataset
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=DIGITS_TEST_SIZE, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    images = _ready_images(x, cfg)
    ready = Prepare()
    return _in_memory(InMemoryImages(images[idx_train], y[idx_train], ready, _shift(cfg)),
                      InMemoryImages(images[idx_test], y[idx_test], ready), 10)


def _fake(cfg: DataConfig) -> Sets:
    """Learnable synthetic data: each class has its own mean image plus noise."""
    classes = cfg.dataset_num_classes() or 10
    g = torch.Generator().manual_seed(1234)
    side, chans = cfg.image_size, cfg.dataset_channels()
    means = torch.randn(classes, chans, side, side, generator=g)

    def make(n: int, augment: Augment | None = None) -> InMemoryImages:
        y = torch.randint(0, classes, (n,), generator=g)
        x = means[y] + 1.5 * torch.randn(n, chans, side, side, generator=g)
        return InMemoryImages(x, y, Prepare(), augment)

    train = make(cfg.train_size, _shift(cfg))
    return _in_memory(train, make(cfg.test_size), classes)


def _uint8_sets(cfg: DataConfig, train_x: torch.Tensor, train_y, test_x: torch.Tensor, test_y,
                gray: bool) -> Sets:
    """uint8 (N, C, H, W) images as in-memory sets with the torchvision path's preprocessing:
    resize, normalise to [-1, 1], the configured channels; augmentation a random crop with
    ``image_size // 8`` zero padding after normalisation (torchvision's RandomCrop after
    Normalize) and, for colour sets, a horizontal flip."""
    prepare = Prepare(size=cfg.image_size, channels=cfg.dataset_channels(), scale=1 / 255,
                      normalize=True)
    augment = None
    if cfg.augment and cfg.image_size // 8 > 0:
        augment = Augment(cfg.image_size // 8, "constant", flip=not gray)
    elif cfg.augment and not gray:
        augment = Augment(0, "constant", flip=True)
    train = InMemoryImages(train_x, torch.as_tensor(train_y), prepare, augment)
    return _in_memory(train, InMemoryImages(test_x, torch.as_tensor(test_y), prepare), 10)


def _idx(cfg: DataConfig) -> Sets:
    """MNIST / Fashion-MNIST from their idx files (see ``idx``); ``download`` fetches them
    with torchvision into ``root`` first."""
    if cfg.download:
        _torchvision_download(cfg)
    arrays = load_idx_set(cfg.name, cfg.root)

    def images(a) -> torch.Tensor:
        return torch.from_numpy(a.copy()).unsqueeze(1)  # copy: frombuffer's array is read-only

    return _uint8_sets(cfg, images(arrays["train_images"]),
                       torch.from_numpy(arrays["train_labels"].astype("int64")),
                       images(arrays["test_images"]),
                       torch.from_numpy(arrays["test_labels"].astype("int64")), gray=True)


def _torchvision_download(cfg: DataConfig) -> None:
    # lazy: torchvision loads only to download
    from torchvision import datasets

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[cfg.name]
    try:
        for train in (True, False):
            cls(str(cfg.root), train=train, download=True)
    except (RuntimeError, OSError) as exc:
        raise CompressPipeError(f"data.download: cannot download {cfg.name} into "
                                f"{Path(cfg.root) / TORCHVISION_DIRS[cfg.name]}: {exc}") from exc


def _cifar(cfg: DataConfig) -> Sets:
    """CIFAR from its binary version (see ``cifar``); ``download`` fetches and unpacks that
    archive into ``root`` first (checked against its published MD5)."""
    if cfg.root is None:
        raise CompressPipeError(f"data.root: {cfg.name!r} needs a root directory (the binary "
                                "version's files, or where download: true puts them)")
    root = Path(cfg.root)
    if cfg.download and cifar.missing_message(cfg.name, root) is not None:
        _cifar_download(cfg.name, root)
    arrays = cifar.load_cifar_set(cfg.name, root)
    sets = _uint8_sets(cfg, torch.from_numpy(arrays["train_images"]),
                       torch.from_numpy(arrays["train_labels"]),
                       torch.from_numpy(arrays["test_images"]),
                       torch.from_numpy(arrays["test_labels"]), gray=False)
    sets.num_classes = cifar.LAYOUTS[cfg.name].classes
    return sets


def _cifar_download(name: str, root: Path) -> None:
    # lazy: torchvision loads only to download
    from torchvision.datasets.utils import download_and_extract_archive

    layout = cifar.LAYOUTS[name]
    try:
        download_and_extract_archive(layout.archive_url, str(root), md5=layout.archive_md5,
                                     remove_finished=True)
    except (RuntimeError, OSError) as exc:
        raise CompressPipeError(f"data.download: cannot download {name} ({layout.archive_url}) "
                                f"into {root}: {exc}") from exc


def _imagefolder(cfg: DataConfig) -> Sets:
    # lazy: importing timm takes seconds; only model building needs it
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

    # lazy: torchvision loads only for the datasets it provides
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import Compose, Grayscale

    root = Path(cfg.root or ".")
    test_dir = next((root / d for d in ("val", "test", "validation") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise CompressPipeError(f"data.root: {root} needs a train/ folder and one of val/, test/ "
                                "or validation/ (one sub-folder per class in each)")
    channels = cfg.dataset_channels()
    size = (channels, cfg.image_size, cfg.image_size)
    if channels == 1:
        # ImageFolder reads RGB; luminance first, normalised with ImageNet's mean statistics
        stats = {"mean": (sum(IMAGENET_DEFAULT_MEAN) / 3,), "std": (sum(IMAGENET_DEFAULT_STD) / 3,)}
        train_tf = Compose([Grayscale(1), create_transform(size, is_training=cfg.augment, **stats)])
        test_tf = Compose([Grayscale(1), create_transform(size, is_training=False, **stats)])
    else:
        train_tf = create_transform(size, is_training=cfg.augment)
        test_tf = create_transform(size, is_training=False)
    train = ImageFolder(str(root / "train"), transform=train_tf)
    plain = ImageFolder(str(root / "train"), transform=test_tf) if cfg.augment else train
    test = ImageFolder(str(test_dir), transform=test_tf)
    if train.classes != test.classes:
        raise CompressPipeError(
            f"data.root: classes of {root / 'train'} and {test_dir} differ "
            f"({len(train.classes)} vs {len(test.classes)})"
        )
    return Sets(train, plain, test, len(train.classes))

