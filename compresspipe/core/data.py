"""Datasets: scikit-learn's bundled digits, torchvision sets, image folders, and fake data."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, Subset, TensorDataset

from .config import DataConfig
from .distributed import rank, world_size
from .errors import CompressPipeError

# Fixed so that every run, on every machine, evaluates on the same 360 digits.
DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


@dataclass
class DataBundle:
    """Train and test sets plus what a model needs to know about them."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    config: DataConfig

    def train_loader(self, generator: torch.Generator | None = None,
                     shard: bool = True) -> DataLoader:
        """Shuffled loader; reseed ``generator`` each epoch for reproducible order.

        Under torchrun (and ``shard``) each process gets its share of every epoch, so
        ``len()`` is the number of steps per epoch of one process; ``shard=False`` gives every
        process the same batches (for decisions that must come out identical on every rank).
        """
        world = world_size()
        if not shard or world == 1:
            return DataLoader(
                self.train, batch_size=self.config.batch_size, shuffle=True, drop_last=False,
                num_workers=self.config.workers, generator=generator,
                persistent_workers=False,
            )
        sampler = ShardSampler(RandomSampler(self.train, generator=generator), rank(), world)
        return DataLoader(
            self.train, batch_size=self.config.batch_size, sampler=sampler, drop_last=False,
            num_workers=self.config.workers, generator=generator, persistent_workers=False,
        )

    def test_loader(self, shard: bool = False) -> DataLoader:
        """The whole test set in order; with ``shard`` under torchrun, this process's share
        (every world-th sample, no padding: shards add up to the set exactly once)."""
        test, world = self.test, world_size()
        if shard and 1 < world <= len(test):
            test = Subset(test, range(rank(), len(test), world))
        return DataLoader(
            test, batch_size=self.config.eval_batch_size or max(self.config.batch_size, 256),
            shuffle=False, num_workers=self.config.workers,
        )


class ShardSampler(Sampler[int]):
    """One process's share of ``base``'s order: every ``world``-th index from ``rank``.

    Not DistributedSampler + set_epoch: the training loop reseeds the loader's generator at every
    epoch (which makes a resumed run see the same batches), and sharding the order drawn from
    that generator keeps this, with the shards of one epoch together being exactly the
    single-process epoch. The order is padded by wrapping around to a multiple of ``world``, as
    DistributedSampler does, so every process runs the same number of steps (DDP needs that).
    """

    def __init__(self, base: Sampler[int], rank: int, world: int):
        self.base, self.rank, self.world = base, rank, world

    def __len__(self) -> int:
        return math.ceil(len(self.base) / self.world)

    def __iter__(self) -> Iterator[int]:
        order = list(self.base)
        total = len(self) * self.world
        while order and len(order) < total:
            order += order[: total - len(order)]
        return iter(order[self.rank: total: self.world])


def build_data(cfg: DataConfig) -> DataBundle:
    """The train/test datasets that ``cfg`` names."""
    builders = {
        "digits": _digits, "fake": _fake, "imagefolder": _imagefolder,
        "mnist": _torchvision, "fashion_mnist": _torchvision,
        "cifar10": _torchvision, "cifar100": _torchvision,
    }
    if cfg.name not in ("digits", "fake") and cfg.channels not in (None, 1, 3):
        raise CompressPipeError(f"data.channels: {cfg.name!r} images can be given 1 "
                                f"(grayscale) or 3 (RGB) channels, not {cfg.channels}")
    train, test, num_classes = builders[cfg.name](cfg)
    if cfg.limit_train:
        train = _subset(train, cfg.limit_train)
    if cfg.limit_test:
        test = _subset(test, cfg.limit_test)
    return DataBundle(train, test, num_classes, cfg.dataset_channels(), cfg.image_size, cfg)


def _subset(ds: Dataset, n: int) -> Dataset:
    if n >= len(ds):
        return ds
    # a fixed random subset, not the first n, because folders are sorted by class
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
    return Subset(ds, sorted(order.tolist()))


class ShiftAugment(Dataset):
    """Random translation by up to 1/8 of the side, for in-memory tensor images.

    No flips: a mirrored digit is a different symbol."""

    def __init__(self, base: TensorDataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        pad = max(1, x.shape[-1] // 8)
        padded = F.pad(x.unsqueeze(0), (pad, pad, pad, pad), mode="replicate").squeeze(0)
        dx, dy = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        return padded[:, dy: dy + x.shape[-2], dx: dx + x.shape[-1]], y


def _to_images(x: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """(N, C, h, w) in [0, 1] -> resized, normalised, with the configured channel count."""
    if x.shape[-1] != cfg.image_size:
        x = F.interpolate(x, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                          align_corners=False)
    x = (x - 0.5) / 0.5
    channels = cfg.dataset_channels()
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1).contiguous()
    return x


def _digits(cfg: DataConfig):
    from sklearn.datasets import load_digits  # lazy: scikit-learn loads only for the digits dataset
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=DIGITS_TEST_SIZE, stratify=digits.target,
        random_state=DIGITS_SPLIT_SEED,
    )
    images = _to_images(x, cfg)
    train = TensorDataset(images[idx_train], y[idx_train])
    test = TensorDataset(images[idx_test], y[idx_test])
    return (ShiftAugment(train) if cfg.augment else train), test, 10


def _fake(cfg: DataConfig):
    """Learnable synthetic data: each class has its own mean image plus noise."""
    classes = cfg.dataset_num_classes() or 10
    g = torch.Generator().manual_seed(1234)
    side, chans = cfg.image_size, cfg.dataset_channels()
    means = torch.randn(classes, chans, side, side, generator=g)

    def make(n: int) -> TensorDataset:
        y = torch.randint(0, classes, (n,), generator=g)
        x = means[y] + 1.5 * torch.randn(n, chans, side, side, generator=g)
        return TensorDataset(x, y)

    train = make(cfg.train_size)
    return (ShiftAugment(train) if cfg.augment else train), make(cfg.test_size), classes


def _torchvision(cfg: DataConfig):
    # lazy: torchvision loads only for the datasets it provides
    from torchvision import datasets, transforms

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST,
           "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[cfg.name]
    gray = cfg.name in ("mnist", "fashion_mnist")
    base = [transforms.Resize(cfg.image_size), transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5])]
    channels = cfg.dataset_channels()
    if channels != (1 if gray else 3):  # gray replicated to RGB, or RGB to luminance
        base.insert(0, transforms.Grayscale(num_output_channels=channels))
    aug = [transforms.RandomCrop(cfg.image_size, padding=cfg.image_size // 8)]
    if not gray:
        aug.append(transforms.RandomHorizontalFlip())
    train_tf = transforms.Compose(base + aug if cfg.augment else base)
    test_tf = transforms.Compose(base)
    try:
        train = cls(str(cfg.root), train=True, download=cfg.download, transform=train_tf)
        test = cls(str(cfg.root), train=False, download=cfg.download, transform=test_tf)
    except (RuntimeError, OSError) as exc:
        raise CompressPipeError(f"data.root: cannot load {cfg.name} from {cfg.root}: {exc}") from exc
    return train, test, len(train.classes)


def _imagefolder(cfg: DataConfig):
    # lazy: importing timm takes seconds; only model building needs it
    from timm.data import create_transform

    # lazy: torchvision loads only for the datasets it provides
    from torchvision.datasets import ImageFolder

    root = Path(cfg.root or ".")
    test_dir = next(root / d for d in ("val", "test", "validation") if (root / d).is_dir())
    channels = cfg.dataset_channels()
    size = (channels, cfg.image_size, cfg.image_size)
    if channels == 1:
        # ImageFolder reads RGB; luminance first, normalised with ImageNet's mean statistics
        # lazy: importing timm takes seconds; only model building needs it
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        # lazy: torchvision loads only for the datasets it provides
        from torchvision.transforms import Compose, Grayscale

        stats = {"mean": (sum(IMAGENET_DEFAULT_MEAN) / 3,), "std": (sum(IMAGENET_DEFAULT_STD) / 3,)}
        train_tf = Compose([Grayscale(1), create_transform(size, is_training=cfg.augment, **stats)])
        test_tf = Compose([Grayscale(1), create_transform(size, is_training=False, **stats)])
    else:
        train_tf = create_transform(size, is_training=cfg.augment)
        test_tf = create_transform(size, is_training=False)
    train = ImageFolder(str(root / "train"), transform=train_tf)
    test = ImageFolder(str(test_dir), transform=test_tf)
    if train.classes != test.classes:
        raise CompressPipeError(
            f"data.root: classes of {root / 'train'} and {test_dir} differ "
            f"({len(train.classes)} vs {len(test.classes)})"
        )
    return train, test, len(train.classes)
